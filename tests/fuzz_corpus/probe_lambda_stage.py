# Hand-written probe (no crash found): stage methods with a generator lambda default, an immediately called lambda, async and await.
class L:
    def forward_attn(self, hidden_states=lambda: (yield)):
        return (lambda: ForwardAttnOutput(*hidden_states))()
    async def forward_aggregate(self, moe_outs, moe_local_idxs, topk_weight, residual):
        return residual + await moe_outs
