"""Low-rank pre-training with refactorization and momentum reset (issue #6). Nothing is public yet."""
