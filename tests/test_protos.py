"""The committed gRPC stubs match generation.proto, and the names other
tools depend on are there."""

from __future__ import annotations

from specray.protos.generate import stale_stubs
from specray.protos.specray.v1 import generation_pb2 as pb


def test_committed_stubs_are_up_to_date() -> None:
    assert stale_stubs() == [], "run `python -m specray.protos.generate` and commit the stubs"


def test_the_v1_service_methods_and_fields_clients_rely_on() -> None:
    service = pb.DESCRIPTOR.services_by_name["Generation"]
    assert service.full_name == "specray.v1.Generation"
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Generate", "GenerateStream", "GetModelInfo"}
    assert not methods["Generate"].server_streaming
    assert methods["GenerateStream"].server_streaming

    request = pb.GenerateRequest.DESCRIPTOR.fields_by_name
    assert [f.name for f in pb.GenerateRequest.DESCRIPTOR.oneofs_by_name["input"].fields] == [
        "text",
        "token_ids",
    ]
    # proto3 `optional` wherever 0 is a real value, so unset and 0 differ.
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "max_tokens",
        "seed",
        "speculative",
        "num_speculative_tokens",
        "fixed_speculation",
    ):
        assert request[name].has_presence, name
    assert {"request_id", "stop", "stop_token_ids", "ignore_eos"} <= set(request)

    response = pb.GenerateResponse.DESCRIPTOR.fields_by_name
    assert {"token_ids", "text", "finish_reason", "usage", "spec_stats", "seed"} <= set(response)
    usage = {name: f.number for name, f in pb.Usage.DESCRIPTOR.fields_by_name.items()}
    # cached_tokens was added as field 3: old clients and servers still read each other.
    assert usage == {"prompt_tokens": 1, "completion_tokens": 2, "cached_tokens": 3}
    assert set(pb.SpecStats.DESCRIPTOR.fields_by_name) == {
        "draft_tokens",
        "accepted_tokens",
        "rounds",
        "fallback",
    }
    assert all(
        name.startswith("FINISH_REASON_") for name in pb.FinishReason.DESCRIPTOR.values_by_name
    )


def test_unset_and_zero_temperature_differ_on_the_wire() -> None:
    unset = pb.GenerateRequest.FromString(pb.GenerateRequest(text="x").SerializeToString())
    zero = pb.GenerateRequest.FromString(
        pb.GenerateRequest(text="x", temperature=0.0).SerializeToString()
    )
    assert not unset.HasField("temperature")
    assert zero.HasField("temperature") and zero.temperature == 0.0
