"""Model adapters: all access to transformers internals lives in this package."""
