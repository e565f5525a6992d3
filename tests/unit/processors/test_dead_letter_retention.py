"""The processors' dead-letter retention job: it prunes what is older than
IOC_DEAD_LETTER_RETENTION_DAYS, on the readings retention's period."""

from __future__ import annotations

from datetime import timedelta

from tests.unit.processors.test_batch_runner import rig


async def test_the_job_prunes_letters_older_than_the_retention_on_its_period() -> None:
    r = rig(dead_letter_retention_days=2.5, retention_check_s=7)
    [job] = [job for job in r.processor.scheduled_jobs() if job.name == "dead-letter retention"]
    assert job.period_s == 7
    await job.run_once()
    assert r.database.dead_letters.pruned == [timedelta(days=2.5)]
