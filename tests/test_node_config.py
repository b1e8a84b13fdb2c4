"""config.toml parsing, the retry policy and the classification of C-STORE outcomes."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from dicom_node.config import DicomDestination, FolderDestination, load_config
from dicom_node.errors import ConfigError
from dicom_node.forwarder import classify_status
from dicom_node.settlement import backoff_seconds
from dicom_node.writer import enhanced_classes

REPO = Path(__file__).resolve().parents[1]

MINIMAL = """
[[destinations]]
name = "archive"
type = "folder"
path = "out"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_the_shipped_config_is_a_working_default():
    config = load_config(REPO / "config.toml")
    assert config.node.ae_title == "ENHANCE" and config.node.port == 11112
    assert config.node.allowed_calling_aets == ()
    assert config.node.require_called_aet is True and config.node.acse_timeout == 5.0
    assert config.spool.dir == REPO / "var" / "spool"
    assert config.model.weights == REPO / "model" / "weights" / "default.pt"
    assert config.model.enhance == ("CR", "DX") and config.model.forward_original is True
    assert config.model.max_burnt_out == 0.02  # the window guard is on
    assert config.destinations == (FolderDestination(name="archive", path=REPO / "var" / "outbox"),)
    assert config.logging.format == "auto"


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    config = load_config(write(tmp_path, MINIMAL + '[spool]\ndir = "s"\n'))
    assert config.spool.dir == tmp_path / "s"
    assert config.destinations[0].path == tmp_path / "out"


def test_a_dicom_destination_and_the_timeouts_are_read(tmp_path):
    text = MINIMAL + """
[node]
allowed_calling_aets = ["CR01", "DX02"]
dimse_timeout = 12.5
[[destinations]]
name = "pacs"
type = "dicom"
ae_title = "PACS"
host = "10.0.0.5"
port = 104
"""
    config = load_config(write(tmp_path, text))
    assert config.node.allowed_calling_aets == ("CR01", "DX02")
    assert config.node.dimse_timeout == 12.5 and config.node.acse_timeout == 5.0  # the default: probes drop fast
    assert config.destination("pacs") == DicomDestination("pacs", "PACS", "10.0.0.5", 104)


@pytest.mark.parametrize("text, message", [
    ('[retry]\ninitial_seconds = "x"\n',
     "config.toml: [retry] initial_seconds must be a number, got 'x'"),
    ("[node]\nport = 70000\n", "[node] port must be between 0 and 65535, got 70000"),
    ("[node]\nport = true\n", "[node] port must be an integer, got True"),
    ("[node]\ncolour = 1\n", "[node] colour is not a known key"),
    ("[model]\nmode = \"paint\"\n", "[model] mode must be one of voi, burn-in, got 'paint'"),
    ("[model]\nenhance = [\"CT\"]\n", "[model] enhance entries must be CR, DX or a SOP Class UID"),
    ("[model]\nforward_original = \"yes\"\n", "[model] forward_original must be true or false"),
    ("[model]\nmax_burnt_out = 1.5\n", "[model] max_burnt_out must be within [0, 1) (0 turns it off), got 1.5"),
    ("[model]\nmax_burnt_out = \"off\"\n", "[model] max_burnt_out must be a number"),
    ("[node]\nae_title = \"MUCH_TOO_LONG_AE_TITLE\"\n", "[node] ae_title must be at most 16 characters"),
    ("[logging]\nformat = \"xml\"\n", "[logging] format must be one of auto, json, console"),
    ("[retry]\ninitial_seconds = 10\nmax_seconds = 5\n", "[retry] max_seconds must be at least"),
    ("[extra]\na = 1\n", "[config] extra is not a known key"),
])
def test_config_errors_name_the_key_and_the_problem(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL + text))
    assert message in str(info.value)


def test_destination_errors_name_the_entry(tmp_path):
    with pytest.raises(ConfigError, match=r"\[destinations #1\] type must be \"folder\" or \"dicom\""):
        load_config(write(tmp_path, '[[destinations]]\nname = "a"\ntype = "ftp"\n'))
    with pytest.raises(ConfigError, match=r"\[destinations #1\] port is required"):
        load_config(write(tmp_path, '[[destinations]]\nname = "a"\ntype = "dicom"\n'
                                    'ae_title = "P"\nhost = "h"\n'))
    with pytest.raises(ConfigError, match=r"\[config\] destinations must be one or more"):
        load_config(write(tmp_path, "[node]\nport = 1\n"))


def test_a_missing_or_broken_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[node\n"))


def test_enhance_names_map_to_the_cr_and_dx_storage_classes():
    assert enhanced_classes(("CR", "DX")) == {
        "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1"}
    assert enhanced_classes(("1.2.840.10008.5.1.4.1.1.1.1",)) == {"1.2.840.10008.5.1.4.1.1.1.1"}


def test_backoff_doubles_with_jitter_and_is_capped(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + "[retry]\ninitial_seconds = 2\nmax_seconds = 300\n"))
    rng = random.Random(0)
    delays = [backoff_seconds(n, config.retry, rng) for n in range(1, 12)]
    for n, delay in enumerate(delays[:7], start=1):
        assert 0.8 * 2 * 2 ** (n - 1) <= delay <= 1.2 * 2 * 2 ** (n - 1)
    assert max(delays) == 300 and delays[-1] == 300
    assert len({round(d, 6) for d in delays[:7]}) == 7  # jitter: no two the same


@pytest.mark.parametrize("status, result", [
    (0x0000, "delivered"), (0xB000, "delivered"), (0xB007, "delivered"),
    (0xA700, "retry"), (0xA7FF, "retry"), (0x0110, "retry"),
    (0xA900, "failed"), (0xA9FF, "failed"), (0xC000, "failed"), (0xCFFF, "failed"),
    (0x0122, "failed"),
])
def test_store_statuses_are_classified(status, result):
    assert classify_status(status).result == result


def test_a_second_copy_of_a_waiting_instance_supersedes_the_first(tmp_path):
    from dicom_node.jobs import JobQueue

    queue = JobQueue(tmp_path / "queue.sqlite3")
    first, superseded = queue.add("1.2.3", "1.2.840.10008.5.1.4.1.1.2", tmp_path / "a.dcm")
    assert superseded == []
    second, superseded = queue.add("1.2.3", "1.2.840.10008.5.1.4.1.1.2", tmp_path / "b.dcm")
    assert superseded == [tmp_path / "a.dcm"]
    assert [j.id for j in queue.claim(10)] == [second]
    # a copy arriving while the first is being processed is queued after it, not merged
    third, superseded = queue.add("1.2.3", "1.2.840.10008.5.1.4.1.1.2", tmp_path / "c.dcm")
    assert superseded == [] and queue.counts() == {"received": 1, "processing": 1, "done": 1, "failed": 0}
    assert "superseded" in queue.jobs("done")[0].last_error


def test_jobs_left_in_processing_are_resumed(tmp_path):
    from dicom_node.jobs import JobQueue

    queue = JobQueue(tmp_path / "queue.sqlite3")
    job_id, _ = queue.add("1.2.3", "1.2.840.10008.5.1.4.1.1.2", tmp_path / "a.dcm")
    assert [j.id for j in queue.claim(10)] == [job_id]
    assert queue.claim(10) == []
    assert JobQueue(tmp_path / "queue.sqlite3").resume() == 1  # as a restarted worker does
    assert [j.id for j in queue.claim(10)] == [job_id]


def test_the_node_queue_commits_without_fsync_and_syncs_on_request(tmp_path):
    from dicom_node.jobs import JobQueue

    with pytest.raises(ValueError, match="synchronous must be one of FULL, NORMAL, not 'OFF'"):
        JobQueue(tmp_path / "queue.sqlite3", synchronous="OFF")
    queue = JobQueue(tmp_path / "queue.sqlite3", synchronous="NORMAL")
    assert queue._conn().execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert JobQueue(tmp_path / "queue.sqlite3")._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    job_id, _ = queue.add("1.2.3", "1.2.840.10008.5.1.4.1.1.2", tmp_path / "a.dcm")
    queue.sync()
    assert [j.id for j in JobQueue(tmp_path / "queue.sqlite3", readonly=True).jobs("received")] == [job_id]


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    bad = tmp_path / "config.toml"
    bad.write_bytes(b"[node]\nae_title = \"\xff\xfe\"\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_a_cuda_device_on_a_machine_without_one_fails_at_start_not_in_the_worker(tmp_path):
    from dicom_node.node import check_ready, cuda_device_count

    have = cuda_device_count()
    weights = f'weights = "{REPO / "model" / "weights" / "default.pt"}"\n'
    config = load_config(write(tmp_path, MINIMAL + f'[model]\n{weights}device = "cuda:{have}"\n'))
    with pytest.raises(ConfigError, match=r"\[model\] device: 'cuda:" + str(have) + "' asked for, but this machine has"):
        check_ready(config)
    check_ready(load_config(write(tmp_path, MINIMAL + f'[model]\n{weights}device = "cpu"\n')))


def test_holding_a_failed_file_twice_keeps_the_file_and_both_reasons(tmp_path):
    from dicom_node.spool import Spool

    spool = Spool(tmp_path / "spool").create()
    source = spool.incoming / "1.dcm"
    source.write_bytes(b"not really dicom")
    held = spool.hold_failed(7, source, "1.2.3", "reason: cannot decode pixel data")
    # the queue did not record the first hold (a disk error while settling): the job comes
    # back, its file is gone from incoming/, and it is held again with another reason
    again = spool.hold_failed(7, source, "1.2.3", "reason: source file missing")
    assert again == held and held.read_bytes() == b"not really dicom"
    reasons = held.with_name(held.name + ".reason.txt").read_text()
    assert "cannot decode pixel data" in reasons and "source file missing" in reasons
    spool.hold_failed(7, source, "1.2.3", "reason: source file missing")
    assert held.with_name(held.name + ".reason.txt").read_text() == reasons


def test_retry_leaves_a_superseded_failed_job_held_with_its_reason(tmp_path):
    from dicom_node.jobs import JobQueue
    from dicom_node.retry import retry_failed
    from dicom_node.spool import Spool

    spool = Spool(tmp_path / "spool").create()
    queue = JobQueue(spool.db_path)
    old, _ = queue.add("1.2.3", "1.2.840.10008.5.1.4.1.1.2", spool.incoming / "old.dcm")
    (spool.incoming / "old.dcm").write_bytes(b"old copy")
    held = spool.hold_failed(old, spool.incoming / "old.dcm", "1.2.3", "reason: refused\n")
    queue.settle(failed=[(old, "refused", held)])
    other, _ = queue.add("1.2.4", "1.2.840.10008.5.1.4.1.1.2", spool.incoming / "other.dcm")
    (spool.incoming / "other.dcm").write_bytes(b"other")
    held_other = spool.hold_failed(other, spool.incoming / "other.dcm", "1.2.4", "reason: refused\n")
    queue.settle(failed=[(other, "refused", held_other)])
    queue.add("1.2.3", "1.2.840.10008.5.1.4.1.1.2", spool.incoming / "new.dcm")  # the instance again

    result = retry_failed(spool, queue, None)

    assert [j.id for j in result.superseded] == [old] and [j.id for j in result.requeued] == [other]
    assert held.with_name(held.name + ".reason.txt").read_text() == "reason: refused\n"  # kept with its file
    assert not held_other.with_name(held_other.name + ".reason.txt").exists()  # queued again: reason in the job


def test_timing_histograms_keep_counts_per_bucket_not_each_time(tmp_path):
    from dicom_node.jobs import TIMING_BUCKETS, JobQueue

    queue = JobQueue(tmp_path / "queue.sqlite3")
    queue.settle(timings=[(1, "enhance", "", 0.005), (2, "enhance", "", 0.01), (3, "enhance", "", 0.3)])
    queue.settle(timings=[(4, "enhance", "", 100.0), (4, "send", "pacs", 0.02)])

    (cumulative, count, total), = queue.timing_histogram("enhance").values()
    at = dict(zip(TIMING_BUCKETS, cumulative))
    assert (at[0.01], at[0.25], at[0.5], at[60], count) == (2, 2, 3, 3, 4)  # 100 s: only in +Inf (= count)
    assert total == pytest.approx(100.315)
    assert queue.timing_histogram("send") == {"pacs": ([0] + [1] * (len(TIMING_BUCKETS) - 1), 1, 0.02)}
    rows = queue._conn().execute("SELECT COUNT(*) FROM timing_buckets").fetchone()[0]
    assert rows == 4  # one row per bucket used, however many times were recorded
