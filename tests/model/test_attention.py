"""Decode attention in the compiled step (model/attention.py): the sums read by slot against SDPA."""

import torch

from loupe.model.attention import AttentionGroup, ForwardBatch, _attend_by_slot


def test_attention_by_slot_matches_sdpa_over_gathered_keys_with_padding_and_masks():
    torch.manual_seed(0)
    k_cache, v_cache = torch.randn(300, 3, 16), torch.randn(300, 3, 16)
    k_cache[0] = v_cache[0] = 0  # slot 0: the padding of slot tables
    lengths = torch.tensor([7, 40, 1, 23])
    slots = torch.randint(1, 300, (4, 40)) * (torch.arange(40)[None, :] < lengths[:, None])
    mask = (torch.arange(40)[None, :] < lengths[:, None])[:, None, None, :]
    q = torch.randn(4, 9, 16) * 3
    compiled = torch.compile(_attend_by_slot, fullgraph=True)
    for rows, m in ((slice(0, 4), mask), (slice(1, 2), None)):  # several rows masked; one row attends all
        group = AttentionGroup(slots[rows], None if m is None else m[rows], None, 1)
        expected = ForwardBatch._attend(group, q[rows], k_cache, v_cache)  # eager: SDPA over gathered copies
        for attend in (_attend_by_slot, compiled):
            torch.testing.assert_close(attend(q[rows], group.slots, group.mask, k_cache, v_cache), expected,
                                       rtol=1e-5, atol=1e-5)
