"""Crash episodes as `WorkersHealthy` tells them: what counts as a crash loop, and what a failed pod
list does to an episode under way (its Warning, the autoscaler's hold)."""

from __future__ import annotations

from typing import Any

from tandem_operator import api
from tandem_operator.autoscaler import hold_crashing
from tandem_operator.autoscaling.policy import AutoscalingSpec, Replicas
from tandem_operator.k8s import ApiError
from tandem_operator.status import observe_pods

from .conftest import NAMESPACE, load_example
from .test_worker_health import DEMO, at, crashed, memory_demo, pod, put_pod, running, workers


def _ran(container: dict[str, Any], started: str) -> dict[str, Any]:
    """`container` whose last run (the one that crashed) had started at `started`."""
    container["lastState"]["terminated"]["startedAt"] = started
    return container


def _aspec() -> AutoscalingSpec:
    spec = load_example("cpu-demo.yaml")["spec"]
    spec["autoscaling"] = {"enabled": True}
    for role in ("prefill", "decode"):
        spec[role].update(replicas=2, minReplicas=1, maxReplicas=8)
    return AutoscalingSpec.from_spec(api.parse_spec(spec).model_dump(by_alias=True, mode="json"))


async def test_one_crash_after_a_long_stable_run_is_no_crash_loop():
    """`restartCount` counts a pod's whole life: a worker that crashed twice last week, then served
    for three days, and crashed once a minute ago was named CrashLoopBackOff, warned as such, and
    its pool held from scaling up. The run that ended lasted far more than 10 minutes, so this is
    one crash (ContainerRestarted), which holds nothing; a second crash soon after is a loop."""
    once = _ran(crashed("Error", 3, at(-1.5), exit_code=1, since=at(-1)), started=at(-3 * 24 * 60))
    seen = observe_pods([pod("d-a", "decode", [once])], ["decode"], at(0))
    assert seen["decode"].reason == "ContainerRestarted"
    assert seen["decode"].message("decode").startswith("decode: ContainerRestarted: 1 of 1 pods")

    # Through a pass: the Warning says so, and the autoscaler adds replicas to the pool as it would.
    now = [at(0)]
    memory, reconciler, events = memory_demo(now)
    put_pod(memory, pod(f"{DEMO}-decode-a", "decode", [once]))
    await reconciler.reconcile(NAMESPACE, DEMO)
    status = memory.objects[(api.KIND, NAMESPACE, DEMO)]["status"]
    assert workers(status)["reason"] == "ContainerRestarted"
    assert [r for _, r, _ in events] == ["ContainerRestarted"]
    aspec, held = hold_crashing(_aspec(), Replicas(prefill=2, decode=2), status)
    assert held == "" and aspec.bounds("decode") == (1, 8)

    # It crashes again 2 minutes into its new run: now it is a loop, and the pool is held.
    again = _ran(crashed("Error", 4, at(1), exit_code=1, since=at(1.2)), started=at(-1))
    put_pod(memory, pod(f"{DEMO}-decode-a", "decode", [again]))
    now[0] = at(2)
    await reconciler.reconcile(NAMESPACE, DEMO)
    status = memory.objects[(api.KIND, NAMESPACE, DEMO)]["status"]
    assert workers(status)["reason"] == "CrashLoopBackOff"
    aspec, held = hold_crashing(_aspec(), Replicas(prefill=2, decode=2), status)
    assert aspec.bounds("decode") == (1, 2) and "decode is not scaled up" in held

    # Without the times of its last run (an older kubelet's status), more than one restart is a loop.
    unknown = crashed("Error", 3, at(-1.5), exit_code=1, since=at(-1))
    assert observe_pods([pod("d-a", "decode", [unknown])], ["decode"], at(0))["decode"].reason == (
        "CrashLoopBackOff"
    )


async def test_a_failed_pod_list_neither_ends_a_crash_episode_nor_lifts_its_hold():
    """One pod list the API server failed (503) set WorkersHealthy Unknown: the episode was lost, so
    the next pass posted its Warning again, and the autoscaler scaled up the OOM-killed pool in
    between. A transient failure keeps the last view; a refusal (403) is still Unknown."""
    now = [at(0)]
    memory, reconciler, events = memory_demo(now)
    put_pod(memory, pod(f"{DEMO}-decode-a", "decode", [crashed("OOMKilled", 3, at(-0.2))]))
    await reconciler.reconcile(NAMESPACE, DEMO)
    status = lambda: memory.objects[(api.KIND, NAMESPACE, DEMO)]["status"]  # noqa: E731
    before = workers(status())
    assert before["reason"] == "OOMKilled" and [r for _, r, _ in events] == ["OOMKilled"]

    memory.refuse[("list", "Pod")] = ApiError(503, "ServiceUnavailable", "the server is unable to answer")
    now[0] = at(1)
    await reconciler.reconcile(NAMESPACE, DEMO)
    assert workers(status()) == before
    aspec, held = hold_crashing(_aspec(), Replicas(prefill=2, decode=2), status())
    assert aspec.bounds("decode") == (1, 2) and "OOMKilled" in held

    del memory.refuse[("list", "Pod")]
    now[0] = at(2)
    await reconciler.reconcile(NAMESPACE, DEMO)
    assert workers(status())["reason"] == "OOMKilled"
    assert [r for _, r, _ in events] == ["OOMKilled"]

    # Not allowed to list pods (a role from before the pods were listed): nothing is known.
    memory.refuse[("list", "Pod")] = ApiError(403, "Forbidden", 'pods is forbidden: cannot list "pods"')
    now[0] = at(3)
    await reconciler.reconcile(NAMESPACE, DEMO)
    assert (workers(status())["status"], workers(status())["reason"]) == ("Unknown", "PodsUnreadable")


def _evicted(name: str, component: str, message: str, when: str) -> dict[str, Any]:
    """A pod the kubelet evicted at `when`, as it reports one (Failed, reason Evicted)."""
    obj = pod(name, component, [])
    obj["status"] = {
        "phase": "Failed",
        "reason": "Evicted",
        "message": message,
        "conditions": [
            {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
             "lastTransitionTime": when},
            {"type": "Ready", "status": "False", "lastTransitionTime": when},
        ],
        "containerStatuses": [
            {"name": "worker", "restartCount": 0, "state": {"terminated": {
                "reason": "ContainerStatusUnknown", "exitCode": 137, "finishedAt": when}}},
        ],
    }  # fmt: skip
    return obj


async def test_a_pod_evicted_for_its_disk_limits_is_reported_and_holds_its_pool():
    """Pods now have ephemeral-storage limits and emptyDir sizeLimits (`model.storageSize`): a
    model that outgrows them gets its pod evicted (Failed, no container restart), and the
    replacement downloads it again to be evicted alike, for ever. WorkersHealthy said Stable: it
    skipped Failed pods. A recent eviction is now named, with what to raise, warned once, and holds
    the pool's scale-up as an OOM kill does; an old one, or one of unknown time, is not."""
    volume = 'Usage of EmptyDir volume "model" exceeds the limit "40Gi". '
    seen = observe_pods([_evicted("d-a", "decode", volume, at(-1))], ["decode"], at(0))
    assert (seen["decode"].pods, seen["decode"].reason) == (0, "Evicted")
    message = seen["decode"].message("decode")
    assert message.startswith("decode: Evicted: 1 pod evicted in the last 10 minutes, the last: pod d-a")
    assert 'Usage of EmptyDir volume "model" exceeds the limit "40Gi"' in message
    assert "raise spec.model.storageSize" in message
    for words in (
        "Pod ephemeral local storage usage exceeds the total limit of containers 42Gi. ",
        'Container worker exceeded its local ephemeral storage limit "42Gi". ',
    ):
        evicted = observe_pods([_evicted("d-a", "decode", words, at(-1))], ["decode"], at(0))["decode"]
        assert "raise spec.model.storageSize" in evicted.message("decode")
    # A node short of memory is no limit of the pod's: no storage hint.
    pressure = "The node was low on resource: memory. Threshold quantity: 100Mi, available: 90Mi. "
    evicted = observe_pods([_evicted("d-a", "decode", pressure, at(-1))], ["decode"], at(0))["decode"]
    assert evicted.reason == "Evicted" and "storageSize" not in evicted.message("decode")
    assert "kubectl describe pod d-a" in evicted.message("decode")
    # Evicted 11 minutes ago, of unknown time, or Failed for another reason: nothing to report.
    old = _evicted("d-b", "decode", volume, at(-11))
    unknown = {**pod("d-c", "decode", []), "status": {"phase": "Failed", "reason": "Evicted"}}
    shutdown = _evicted("d-d", "decode", "Pod was terminated in response to imminent node shutdown.", at(-1))
    shutdown["status"]["reason"] = "Terminated"
    assert observe_pods([old, unknown, shutdown], ["decode"], at(0))["decode"].reason is None

    # Through passes: one Warning per episode, and the autoscaler adds no decode replica meanwhile.
    now = [at(0)]
    memory, reconciler, events = memory_demo(now)
    put_pod(memory, _evicted(f"{DEMO}-decode-a", "decode", volume, at(-1)))
    await reconciler.reconcile(NAMESPACE, DEMO)
    status = lambda: memory.objects[(api.KIND, NAMESPACE, DEMO)]["status"]  # noqa: E731
    assert (workers(status())["status"], workers(status())["reason"]) == ("False", "Evicted")
    put_pod(memory, _evicted(f"{DEMO}-decode-b", "decode", volume, at(0.5)))
    now[0] = at(1)
    await reconciler.reconcile(NAMESPACE, DEMO)
    assert "2 pods evicted" in workers(status())["message"]
    assert [r for _, r, _ in events] == ["Evicted"]
    aspec, held = hold_crashing(_aspec(), Replicas(prefill=2, decode=2), status())
    assert aspec.bounds("decode") == (1, 2) and "decode is not scaled up" in held and "Evicted" in held
    # Ten minutes without another eviction: stable again.
    now[0] = at(11)
    await reconciler.reconcile(NAMESPACE, DEMO)
    assert workers(status())["reason"] == "Stable"


def test_a_cuda_error_out_of_memory_is_a_gpu_oom_too():
    """Outside torch's caching allocator (a library's workspace, the CUDA context of a new stream) a
    failed cudaMalloc is "RuntimeError: CUDA error: out of memory", no OutOfMemoryError: it was named
    CrashLoopBackOff, with a hint to read the logs instead of the GPU memory budgets to lower."""
    oom = crashed("Error", 2, at(-1), exit_code=1)
    oom["lastState"]["terminated"]["message"] = (
        '  File "/opt/tandem/lib/python3.11/site-packages/torch/cuda/__init__.py", line 372\n'
        "RuntimeError: CUDA error: out of memory\n"
        "CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace "
        "below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1"
    )
    seen = observe_pods([pod("d-a", "decode", [oom])], ["decode"], at(0))["decode"]
    assert seen.reason == "GPUOutOfMemory" and "spec.decode.kvCacheBytes" in seen.message("decode")


def _waiting(reason: str, message: str, name: str = "worker") -> dict[str, Any]:
    """A container the kubelet cannot start: never ran, waiting with `reason`."""
    return {
        "name": name,
        "ready": False,
        "restartCount": 0,
        "state": {"waiting": {"reason": reason, "message": message}},
    }


async def test_containers_that_cannot_start_are_named_with_what_to_fix_and_hold_the_pool():
    """A wrong image tag, or a private registry without pull secrets, leaves every new pod in
    ImagePullBackOff, and a missing Secret in CreateContainerConfigError: nothing crashed, so
    WorkersHealthy said Stable while no worker ever ran. Now it names them (the download's init
    container too), and the autoscaler adds no replica: each would hold a GPU and serve nothing."""
    pull = _waiting("ImagePullBackOff", 'Back-off pulling image "tandem:nope"')
    first = _waiting("ErrImagePull", "rpc error: code = NotFound desc = failed to pull and unpack image")
    secret = _waiting("CreateContainerConfigError", 'secret "hf-token" not found')
    seen = observe_pods(
        [
            pod("d-a", "decode", [pull]),
            pod("d-b", "decode", [first]),
            pod("d-c", "decode", [_waiting("PodInitializing", "")], init=[{**pull, "name": "fetch-model"}]),
            pod("p-a", "prefill", [secret]),
        ],
        ["prefill", "decode"],
        at(0),
    )
    assert (
        seen["decode"].reason == "ImagePullBackOff" and seen["prefill"].reason == "CreateContainerConfigError"
    )
    message = seen["decode"].message("decode")
    assert message.startswith("decode: ImagePullBackOff: 3 of 3 pods cannot start their containers")
    assert 'pod d-a container worker ImagePullBackOff: Back-off pulling image "tandem:nope"' in message
    assert "spec.image" in message and "spec.imagePullSecrets" in message
    message = seen["prefill"].message("prefill")
    assert (
        'CreateContainerConfigError: secret "hf-token" not found' in message
        and "kubectl describe pod p-a" in message
    )

    # Through a pass: the condition, one Warning, and the autoscaler's hold.
    now = [at(0)]
    memory, reconciler, events = memory_demo(now)
    put_pod(memory, pod(f"{DEMO}-decode-a", "decode", [pull]))
    await reconciler.reconcile(NAMESPACE, DEMO)
    status = memory.objects[(api.KIND, NAMESPACE, DEMO)]["status"]
    assert (workers(status)["status"], workers(status)["reason"]) == ("False", "ImagePullBackOff")
    assert [r for _, r, _ in events] == ["ImagePullBackOff"]
    aspec, held = hold_crashing(_aspec(), Replicas(prefill=2, decode=2), status)
    assert aspec.bounds("decode") == (1, 2) and "decode is not scaled up" in held

    # Pulled at last and running: stable (it never crashed).
    put_pod(memory, pod(f"{DEMO}-decode-a", "decode", [running(since=at(0.5))]))
    now[0] = at(1)
    await reconciler.reconcile(NAMESPACE, DEMO)
    assert workers(memory.objects[(api.KIND, NAMESPACE, DEMO)]["status"])["reason"] == "Stable"


def test_a_pod_that_cannot_start_beside_a_crashed_one_is_not_counted_among_the_crashed():
    """A pool with an OOM-killed pod and one stuck pulling its image said "2 of 2 pods crashed": the
    second never ran. Now it is named for what it is, and the last crash is the one that ran."""
    oom = crashed("OOMKilled", 2, at(-1), exit_code=137)
    pull = _waiting("ImagePullBackOff", 'Back-off pulling image "tandem:nope"')
    seen = observe_pods([pod("d-a", "decode", [oom]), pod("d-b", "decode", [pull])], ["decode"], at(0))
    assert seen["decode"].reason == "OOMKilled"
    message = seen["decode"].message("decode")
    assert "1 of 2 pods crashed and 1 cannot start its containers (ImagePullBackOff)" in message
    assert "(2 restarts in all), the last: pod d-a container worker OOMKilled (exit code 137)" in message
    assert "spec.decode.memory" in message
