"""The OpenAI-compatible surface over Ponder's jobs: `common` (what every OpenAI request shares: its
JobCreate, errors in its own terms, the thinking budget, waiting and cancelling), then one module
per resource (`models`, `chat`, `responses`, `files`, `batches`) and their schemas. The routes are
ponder/api/routes/openai_*.py."""
