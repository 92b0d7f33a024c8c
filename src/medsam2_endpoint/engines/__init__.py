"""Model adapters. Each engine sees arrays and typed prompts only: never JSON, HTTP or the environment."""
