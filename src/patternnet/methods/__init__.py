"""Methods: each is a choice of rules and a start value over the one engine."""
