"""Report classification: a language model or rules decide, the ledger records the result."""
