"""Task data: readers for LLaVA-style conversations and simple prompt/answer JSONL."""

from edgekv.data.readers import Example, read_examples, resolve_images, write_jsonl

__all__ = ["Example", "read_examples", "resolve_images", "write_jsonl"]
