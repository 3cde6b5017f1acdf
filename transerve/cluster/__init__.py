"""`transerve cluster`: engine replicas on Ray Serve behind one OpenAI endpoint (needs the `cluster` extra)."""
