"""bench.deployment's measurement helpers (the whole benchmark starts nine servers: run it by hand)."""
import os
import subprocess

from bench.deployment import checkout, group_rss_mib


def test_group_rss_counts_every_process_of_the_group():
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        rss, processes = group_rss_mib(child.pid)
        assert processes == 1 and 0 < rss < 64
        own, _ = group_rss_mib(os.getpgid(0))
        assert own > rss  # this Python process (torch loaded) is far larger than sleep
    finally:
        child.kill()
        child.wait(timeout=10)


def test_checkout_extracts_the_tree_of_a_revision(tmp_path):
    tree = checkout("HEAD", tmp_path)
    assert (tree / "runtime" / "rowloop.py").is_file() and (tree / "model_repository").is_dir()
