# Hand-written probe (no crash found): a match statement on self binding self.mlp in a class pattern.
class L:
    def forward_attn(self, hidden_states):
        match self:
            case L(mlp=m):
                self.mlp = m
        return hidden_states
