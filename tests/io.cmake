# io tests (owned by the io component)
