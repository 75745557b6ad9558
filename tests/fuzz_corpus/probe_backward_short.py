# Hand-written probe (no crash found): a model backward that takes no parameters; a per-layer backward called with none.
class L(nn.Module):
    def forward_attn(self, hidden_states): ...
class M(nn.Module):
    def __init__(self): self.layers = [L()]
    @staticmethod
    def backward(): decoder_layer_backward()
    def forward(self): return self._intermediate_tensors
