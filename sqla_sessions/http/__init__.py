"""HTTP, shared by every integration: the per-request policy (`web`), cookies, a blocking request's
body, user-agent names. Imports the core and the store; the integrations above import it."""
