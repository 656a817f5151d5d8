"""Rankers (TransAct V2 and baselines), crossing layers, heads and the Next Action Loss."""
