"""Model building blocks, one per file: norm, rotary embedding, paged attention."""
