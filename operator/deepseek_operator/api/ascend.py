"""spec.worker.ascend: what a worker pod on Ascend NPUs needs beyond the device-plugin resource:
the host's driver and tools, the device group, the network HCCL uses and its environment."""

from __future__ import annotations

from pydantic import Field

from .base import ApiModel

# HwHiAiUser, the group that owns /dev/davinci* in the Ascend driver's default install.
DEFAULT_DEVICE_GROUP_ID = 1000


class Ascend(ApiModel):
    """Ascend NPU settings of the worker pods; used only when accelerator.type is npu."""

    driver_mounts: bool = Field(
        True,
        description="Mount the host's /usr/local/Ascend/driver, /usr/local/dcmi, "
        "/usr/local/bin/npu-smi, /etc/ascend_install.info and /etc/hccn.conf read-only into "
        "the engine (what torch_npu, HCCL and npu-smi read). Turn off when the image or a "
        "runtime hook (Ascend Docker Runtime) provides them.",
    )
    device_group_id: int = Field(
        DEFAULT_DEVICE_GROUP_ID,
        ge=0,
        le=2147483647,
        description="Group id that owns /dev/davinci* on the nodes (HwHiAiUser, 1000 by "
        "default); added to the pod's supplementalGroups so the non-root engine may open "
        "the devices.",
    )
    host_network: bool = Field(
        False,
        description="Run the worker pods in the host's network namespace (hostNetwork, with "
        "dnsPolicy ClusterFirstWithHostNet), as MindIE's bare-metal multi-node flow does.",
    )
    hccl_connect_timeout: int = Field(
        1200,
        ge=120,
        le=7200,
        description="HCCL_CONNECT_TIMEOUT in seconds: how long ranks wait for each other's "
        "HCCL links [120, 7200].",
    )
    hccl_buffer_mb: int | None = Field(
        None,
        ge=1,
        le=65536,
        description="HCCL_BUFFSIZE in MB. Default: unset, except with expertParallel.level 2 "
        "(AllToAll EP), where it is sized for one prefill of serving.maxInputTokenLen tokens "
        "(tokens x hidden size x 2 bytes, at least HCCL's default of 200).",
    )
