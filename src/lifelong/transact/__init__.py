"""TransAct V2's room: rank rows with NN feature logging, the rankers that read them (TransAct V2,
TransAct, BST, wide&deep), their trainer, evaluation, the paper's experiment tables and the
optimized serving path."""
