"""The broadcast WebSocket server: client sessions, subscriptions, fan-out."""
