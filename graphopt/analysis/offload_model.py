"""How much of each saved activation the host link can move without the step waiting for it.

Every offloaded activation crosses the host link twice: device -> host after it is produced in the
forward, host -> device before its first use in the backward. All offloads share one D2H queue and
all reloads one H2D queue (``host_link_gbps`` each way, from the device profile), so a tensor's
window is what the tensors ahead of it in the same queue leave free:

    forward  (D2H, in production order): copies start when the tensor exists and must end by the
             end of the forward (the last wait point), else the forward stalls by the overrun;
    backward (H2D, in order of first use): copies start when the backward starts and must end by
             the tensor's first use, else the backward stalls there.

``hidden_fractions`` gives each tensor the fraction alpha of its bytes (its last tokens, see
``graphopt.ops.offload``) that fits the windows when the queues are filled greedily -- earlier
tensors first in each queue. ``offload_options`` prices alphas for every tensor with the other
tensors at their hidden fraction: exposed time is the stall the two queues add, simulated.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

from graphopt.analysis.device_profile import DeviceProfile

log = logging.getLogger("graphopt.analysis.offload_model")

# Fractions the options offer besides each tensor's hidden fraction.
OPTION_ALPHAS = (0.25, 0.5, 0.75, 1.0)
# Stall (seconds) below which an option counts as hidden: rounding of the queue simulation.
HIDDEN_TOLERANCE_S = 1e-7


@dataclasses.dataclass(frozen=True)
class OffloadOption:
    """Offload the fraction ``alpha`` of one saved tensor's bytes to host memory."""

    alpha: float
    device_bytes_freed: int
    host_bytes: int
    exposed_time_s: float


def planning_profile(profile: DeviceProfile, link_slack: float) -> DeviceProfile:
    """The profile the offload schedule plans with: the host link slowed by ``link_slack``
    (``config.offload_link_slack``), so each copy is given that much more time than it should need.

    A schedule planned at the measured bandwidth is full to the end of each window: any error of
    the op times or of the link can become a stall of the compute stream at an offload wait or a
    reload (measured at S = 8K on one H100, before waits were sunk and reloads hoisted: 1.2 ms of
    D2H and 1.3 ms of H2D waits in a 72 ms step with no slack; after, no slack cost nothing
    measurable, see ``config.offload_link_slack``)."""
    if not link_slack:
        return profile
    return dataclasses.replace(profile, host_link_gbps=profile.host_link_gbps / (1.0 + link_slack))


def transfer_time_s(nbytes: float, profile: DeviceProfile) -> float:
    """One copy over the host link: launch latency plus bytes at ``host_link_gbps``."""
    if nbytes <= 0:
        return 0.0
    return profile.kernel_launch_s + nbytes / (profile.host_link_gbps * 1e9)


def _d2h_order(saved) -> list:
    return sorted(saved, key=lambda t: (t.fw_index, t.name))


def _h2d_order(saved) -> list:
    return sorted(saved, key=lambda t: (t.bw_time_before_s, t.bw_index, t.name))


def queue_stall_s(saved: Sequence, alphas: dict[str, float], profile: DeviceProfile) -> tuple[float, float]:
    """(forward stall, backward stall) of offloading ``alphas[name]`` of every tensor.

    Forward times are measured back from the end of the forward (a tensor is produced at
    ``-fw_time_after_s``); backward times from its start. Both queues are FIFO."""
    link_free = float("-inf")
    for tensor in _d2h_order(saved):
        nbytes = alphas.get(tensor.name, 0.0) * tensor.nbytes
        if nbytes > 0:
            link_free = max(link_free, -tensor.fw_time_after_s) + transfer_time_s(nbytes, profile)
    forward_stall = max(0.0, link_free)
    link_free, backward_stall = 0.0, 0.0
    for tensor in _h2d_order(saved):
        nbytes = alphas.get(tensor.name, 0.0) * tensor.nbytes
        if nbytes > 0:
            link_free += transfer_time_s(nbytes, profile)
            late = link_free - (tensor.bw_time_before_s + backward_stall)
            backward_stall += max(0.0, late)
    return forward_stall, backward_stall


def hidden_fractions(saved: Sequence, profile: DeviceProfile) -> dict[str, float]:
    """Per tensor, the largest fraction both queues hide, filling each queue earliest-first."""
    return window_fractions(saved, profile)[1]


def window_bytes(saved: Sequence, profile: DeviceProfile, forward_s: float | None = None) -> dict[str, Any]:
    """How far each window reaches, in bytes: the saved bytes, what the forward's D2H queue
    hides, and what stays hidden once the backward's H2D queue must also finish each reload
    before its first use (the sum of ``hidden_fractions``).

    With ``forward_s`` (the whole forward), also where the D2H queue's time goes: the link is
    idle before the first saved tensor exists (``d2h_before_first_s``) and whenever the copies
    catch up with production (``d2h_gaps_s``), so it carries less than forward_s x bandwidth."""
    forward, hidden = window_fractions(saved, profile)
    result: dict[str, Any] = {
        "saved_bytes": int(sum(t.nbytes for t in saved)),
        "d2h_window_bytes": int(sum(forward[t.name] * t.nbytes for t in saved)),
        "d2h_and_h2d_window_bytes": int(sum(hidden[t.name] * t.nbytes for t in saved))}
    if forward_s is not None and saved:
        rate = profile.host_link_gbps * 1e9
        first = forward_s - max(t.fw_time_after_s for t in saved)
        link_free, gaps = float("-inf"), 0.0
        for tensor in _d2h_order(saved):
            produced = -tensor.fw_time_after_s
            if link_free != float("-inf") and produced > link_free:
                gaps += produced - link_free
            nbytes = forward[tensor.name] * tensor.nbytes
            if nbytes > 0:
                link_free = max(link_free, produced) + transfer_time_s(nbytes, profile)
        result.update(forward_s=forward_s, d2h_before_first_s=first, d2h_gaps_s=gaps,
                      d2h_link_bytes=int(forward_s * rate))
    return result


def window_fractions(saved: Sequence, profile: DeviceProfile) -> tuple[dict[str, float], dict[str, float]]:
    """(forward, both): per tensor the fraction the D2H queue hides in the forward, and the
    fraction both queues hide (the H2D queue in order of first backward use, each tensor at most
    its forward fraction)."""
    rate = profile.host_link_gbps * 1e9
    forward_cap: dict[str, float] = {}
    link_free = float("-inf")
    for tensor in _d2h_order(saved):
        start = max(link_free, -tensor.fw_time_after_s) + profile.kernel_launch_s
        alpha = _fraction(-start * rate, tensor.nbytes)
        forward_cap[tensor.name] = alpha
        if alpha > 0:
            link_free = start + alpha * tensor.nbytes / rate
    hidden: dict[str, float] = {}
    link_free = 0.0
    for tensor in _h2d_order(saved):
        start = link_free + profile.kernel_launch_s
        alpha = min(forward_cap[tensor.name], _fraction((tensor.bw_time_before_s - start) * rate,
                                                        tensor.nbytes))
        hidden[tensor.name] = alpha
        if alpha > 0:
            link_free = start + alpha * tensor.nbytes / rate
    return forward_cap, hidden


@dataclasses.dataclass(frozen=True)
class Copy:
    """One offloaded tensor on a timed schedule: indices into its forward and backward steps."""

    name: str
    host_bytes: int   # what crosses the link each way
    produced: int     # the forward step that writes its allocation: the copy starts as it ends
    last_read: int    # the last forward step that reads it: its wait comes after
    first_use: int    # the first backward step that reads it (len(backward): none does)


def copy_points(forward_s: Sequence[float], backward_s: Sequence[float], copies: Sequence[Copy],
                profile: DeviceProfile) -> tuple[dict[str, tuple[int, int]], float]:
    """Where each copy's wait and reload go, and the stall the two queues add to the step.

    Forward: the D2H queue copies in production order, each copy starting once its tensor is
    written and the copy before it is done; the compute stream waits for it before the first step
    that starts after the copy ends (and after its last reader), or at the forward's end --
    ``len(forward_s)`` -- where the forward stalls by any overrun. Backward: the H2D queue in order
    of first use, each reload issued before the last step that starts no later than the copy must
    (walking back from the last first use, every copy due at its first use and before the next
    copy starts), so a reload holds its memory no longer than the link needs; a copy that cannot
    make it is issued at the start and stalls its first use by its lateness.
    Returns ({name: (wait index, issue index)}, forward stall + backward stall)."""
    fw_start = _starts(forward_s)
    forward_end = fw_start[-1]
    points: dict[str, list[int]] = {}
    link_free = 0.0
    for copy in sorted(copies, key=lambda c: (c.produced, c.name)):
        ready = fw_start[copy.produced + 1] if copy.produced < len(forward_s) else forward_end
        link_free = max(link_free, ready) + transfer_time_s(copy.host_bytes, profile)
        wait = next((i for i in range(copy.last_read + 1, len(forward_s)) if fw_start[i] >= link_free),
                    len(forward_s))
        points[copy.name] = [wait, 0]
    stall = max(0.0, link_free - forward_end) if copies else 0.0
    bw_start = _starts(backward_s)
    used = sorted((c for c in copies if c.first_use < len(backward_s)),
                  key=lambda c: (c.first_use, c.name))
    next_begin = float("inf")
    for copy in reversed(used):
        begin = min(bw_start[copy.first_use], next_begin) - transfer_time_s(copy.host_bytes, profile)
        points[copy.name][1] = max((i for i in range(copy.first_use + 1) if bw_start[i] <= begin),
                                   default=0)
        next_begin = begin
    link_free, late = 0.0, 0.0
    for copy in used:
        link_free = max(link_free, bw_start[points[copy.name][1]] + late) + transfer_time_s(
            copy.host_bytes, profile)
        late += max(0.0, link_free - (bw_start[copy.first_use] + late))
    for copy in copies:
        if copy.first_use >= len(backward_s):
            points[copy.name][1] = len(backward_s)
    return {name: (wait, issue) for name, (wait, issue) in points.items()}, stall + late


def _starts(seconds: Sequence[float]) -> list[float]:
    """Start time of every step and, last, the end of the schedule."""
    starts, elapsed = [], 0.0
    for value in seconds:
        starts.append(elapsed)
        elapsed += value
    return starts + [elapsed]


def _fraction(window_bytes: float, nbytes: int) -> float:
    if nbytes <= 0 or window_bytes <= 0:
        return 0.0
    return min(1.0, window_bytes / nbytes)


def offload_options(saved: Sequence, profile: DeviceProfile,
                    host_capacity: int | None) -> dict[str, list[OffloadOption]]:
    """Offload choices per saved tensor, priced by the shared D2H / H2D queues.

    An option moves ``alpha * nbytes`` (the tensor's elements) and frees its device allocation
    (``freed_nbytes``: a view's base) less the kept part.

    Each tensor gets its hidden fraction (exposed time ~0) and the fractions of ``OPTION_ALPHAS``
    above it, each with the stall it adds when every other tensor offloads its hidden fraction.
    Options needing more host memory than ``host_capacity`` bytes (``config.offload_host_capacity``;
    None: no limit) are left out."""
    hidden = hidden_fractions(saved, profile)
    base_forward, base_backward = queue_stall_s(saved, hidden, profile)
    options: dict[str, list[OffloadOption]] = {}
    for tensor in saved:
        alphas = sorted({a for a in OPTION_ALPHAS if a > hidden[tensor.name]}
                        | ({hidden[tensor.name]} if hidden[tensor.name] > 0 else set()))
        choices = []
        for alpha in alphas:
            nbytes = int(alpha * tensor.nbytes)
            if host_capacity is not None and nbytes > host_capacity:
                continue
            forward, backward = queue_stall_s(saved, {**hidden, tensor.name: alpha}, profile)
            exposed = max(0.0, forward - base_forward) + max(0.0, backward - base_backward)
            # the kept part is a fresh tensor; the rest of the allocation (a view's whole base) goes
            freed = max(0, tensor.freed_nbytes - (tensor.nbytes - nbytes))
            choices.append(OffloadOption(alpha, freed, nbytes, exposed))
        options[tensor.name] = choices
    return options


def hidden_plan(saved: Sequence, options: dict[str, list[OffloadOption]], capacity: int | None,
                min_bytes: int = 0, profile: DeviceProfile | None = None) -> dict[str, float]:
    """{name: alpha}: per tensor the largest option whose exposed time is negligible, earliest
    produced first while the host capacity lasts (deterministic: every rank makes the same plan).

    Each option is priced with the other tensors at their hidden fractions, so two options can
    each fit alone and stall together (both reach for the same slack in a queue). With
    ``profile``, every choice is checked against the queues of the plan so far: the combined
    stall grows by at most ``HIDDEN_TOLERANCE_S`` per planned tensor."""
    plan: dict[str, float] = {}
    used = 0
    stall = 0.0
    for tensor in _d2h_order(saved):
        hidden = sorted((o for o in options.get(tensor.name, ())
                         if o.exposed_time_s <= HIDDEN_TOLERANCE_S
                         and o.host_bytes >= max(min_bytes, 1)),
                        key=lambda o: o.alpha, reverse=True)
        for option in hidden:
            if capacity is not None and used + option.host_bytes > capacity:
                continue
            if profile is not None:
                combined = sum(queue_stall_s(saved, {**plan, tensor.name: option.alpha}, profile))
                if combined > stall + HIDDEN_TOLERANCE_S:
                    continue
                stall = combined
            plan[tensor.name] = option.alpha
            used += option.host_bytes
            break
    return plan
