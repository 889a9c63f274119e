"""Exchange emulators, one per exchange: what a connection subscribed to, which tape
frames it gets, what the REST endpoints answer, and the books kept as the tape plays.
Sans-IO: the emulator server drives them."""
