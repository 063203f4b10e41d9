"""Example handlers for the demo workflows; load with
`load_modules(["handlers.examples.orders", "handlers.examples.deploy"])`."""
