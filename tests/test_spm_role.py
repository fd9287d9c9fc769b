"""The SPM role lost and taken back around the runtime's calls, on the simulated SPM.

While the host is not the SPM, VDSM answers 401 (unknown task) to a call on one task: it unloads
the SPM's tasks, and lists them again after spmStart. A task the runtime was clearing then must
be cleared once it is listed again, never taken for an orphan (a finished one would be reverted,
undoing its chain's work).
"""

from __future__ import annotations

import pytest
from _engine_proc import ENGINE_OPTIONS, chain_specs
from conftest import wait_until

from actors._chain import ENDED_SUCCESSFULLY
from actors._loadtest import pool_ids
from actors._runtime import Runtime, RuntimeOptions
from spm._simulator import SimulatedSpm

pytestmark = pytest.mark.timeout(60)

WAIT = 15.0


class _LosingTheRoleAtAClear(SimulatedSpm):
    """Loses the SPM role just as the runtime clears its first task; takes it back right after
    that clear was answered (401)."""

    lost = False

    def clearTask(self, task_id: str) -> None:  # noqa: N802
        if self.lost:
            return super().clearTask(task_id)
        self.lost = True
        self.spm_stop()
        try:
            return super().clearTask(task_id)
        finally:
            self.spm_start()


def test_a_task_whose_clear_met_a_lost_spm_role_is_cleared_when_listed_again(seed: int) -> None:
    pool = pool_ids(1, seed)[0]
    spm = _LosingTheRoleAtAClear(pool, durations=0.0, seed=seed)
    specs = chain_specs(3, 2, seed, [pool])
    rt = Runtime({pool: spm}, RuntimeOptions(**{**ENGINE_OPTIONS, "orphan_grace_s": 0.2})).start()
    try:
        handles = [rt.submit(spec) for spec in specs]
        for handle in handles:
            assert handle.result(WAIT).outcome == ENDED_SUCCESSFULLY
        wait_until(lambda: not spm.getAllTasksStatuses(), "every task cleared", WAIT)
        assert spm.lost
    finally:
        rt.stop()
    stats = spm.stats()
    assert stats.tasks_reverted == 0  # no finished task was taken for an orphan
    assert spm.duplicated_effects() == 0
    for spec in specs:  # every chain's volumes are there
        made = {o.vol_uuid for o in spm.objects() if o.img_uuid == spec.params["imgUUID"]}
        assert made >= {s.params["volUUID"] for s in spec.steps or []}, spec.chain_id
    spm.close()
