"""Collectors: the trio tasks that connect to exchanges and feed the dispatcher."""
