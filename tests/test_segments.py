import pytest

from excitation_dist.segments import ExpertRange, owned_expert_ranges, stacked_expert_ranges


def test_stacked_ranges():
    assert stacked_expert_ranges(12, 3, first_expert=4) == [
        ExpertRange(4, 0, 4), ExpertRange(5, 4, 8), ExpertRange(6, 8, 12)]
    with pytest.raises(ValueError, match="cannot hold"):
        stacked_expert_ranges(10, 3)


def test_owned_range_cutting_through_experts():
    experts = stacked_expert_ranges(12, 3)  # [0,4) [4,8) [8,12)
    # this rank owns elements 2..9 of the parameter, stored at offset 100 of its partition
    assert owned_expert_ranges(experts, 2, 10, offset=100) == [
        ExpertRange(0, 100, 102), ExpertRange(1, 102, 106), ExpertRange(2, 106, 108)]
    assert owned_expert_ranges(experts, 4, 8) == [ExpertRange(1, 0, 4)]
    assert owned_expert_ranges(experts, 12, 12) == []


def test_every_element_owned_exactly_once_across_ranks():
    experts = stacked_expert_ranges(60, 4)
    bounds = [0, 7, 22, 23, 45, 60]  # five ranks with uneven shards
    seen = []
    for lo, hi in zip(bounds, bounds[1:]):
        for r in owned_expert_ranges(experts, lo, hi, offset=0):
            seen += [(r.expert, lo + i) for i in range(r.start, r.end)]
    assert sorted(seen) == sorted((e.expert, i) for e in experts for i in range(e.start, e.end))


def test_version_gate_uses_pep440_ranges(monkeypatch):
    import pytest

    from excitation_dist import versions

    assert versions.in_range("0.19.8+cu130", ">=0.19.0,<0.20")
    assert versions.in_range("0.19.2rc1", ">=0.16.1,<0.20")
    assert not versions.in_range("0.20.0", ">=0.19.0,<0.20") and not versions.in_range("weird", ">=0.1")
    with pytest.raises(versions.UnsupportedVersionError, match=r"DeepSpeed >=0.19.0,<0.20 \(tested: 0.19.8\); found 0.20.1.*pip install"):
        versions.require("DeepSpeed", "0.20.1", ">=0.19.0,<0.20", checked="0.19.8", install="pip install deepspeed==0.19.8",
                         skip_env="SKIP_IT")
    monkeypatch.setenv("SKIP_IT", "1")
    versions.require("DeepSpeed", "0.20.1", ">=0.19.0,<0.20", checked="0.19.8", install="-", skip_env="SKIP_IT")
