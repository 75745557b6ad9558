# Hand-written probe (no crash found): torch.compile on a class, on a property, with **options and no arguments.
@torch.compile(fullgraph=True)
class L(nn.Module):
    @torch.compile(fullgraph=True)
    @property
    def forward_attn(self): print(1)
    @torch.compile(**opts)
    def forward_aggregate(self, *a): x.item()
    @torch.compile()
    def _forward_attn_compute(self): STATS[0] = 1
