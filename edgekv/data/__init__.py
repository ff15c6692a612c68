"""Task data: readers for LLaVA-style conversations and simple prompt/answer JSONL."""

from edgekv.data.readers import (
    Example,
    default_task_name,
    read_examples,
    resolve_images,
    write_jsonl,
)

__all__ = ["Example", "default_task_name", "read_examples", "resolve_images", "write_jsonl"]
