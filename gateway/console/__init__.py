"""The operators' console, served on the admin listener (gateway.admin): login, message
search and pages, deliveries with replay and dead-letter, destinations, facilities, the
mapping set. web.py serves it; the other modules are pure or take a connection."""
