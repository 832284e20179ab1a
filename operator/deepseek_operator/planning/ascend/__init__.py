"""What worker pods on Ascend NPUs need: the HCCL rank table (rank_table), and the host's driver
and tools, the device group, the host network and the HCCL environment (pod)."""
