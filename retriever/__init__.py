"""Retrieval: token-aware chunking, embeddings, the faiss index and the document catalog."""
