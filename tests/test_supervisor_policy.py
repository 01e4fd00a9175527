"""The supervisor's policy without a server: which models to reload, when to stop restarting."""

from triffusion.supervisor import RestartPolicy, group_by_model, missing_stubs


def test_a_model_with_a_missing_stub_is_named_once():
    expected = group_by_model({"unet_0_0": 1, "text_to_image_0_0": 2, "text_to_image_0_1": 3, "unet_tiny_lite_0_0": 4})
    assert expected["text_to_image"] == {"text_to_image_0_0", "text_to_image_0_1"}
    running = {"unet_0_0": 1, "text_to_image_0_0": 2, "unet_tiny_lite_0_0": 9}  # a new pid is fine
    assert missing_stubs(expected, running) == ["text_to_image"]
    assert missing_stubs(expected, {}) == ["text_to_image", "unet", "unet_tiny_lite"]


def test_restarts_back_off_and_stop_after_the_limit_within_the_window():
    policy = RestartPolicy(limit=3, window_s=100.0, first_backoff_s=1.0, max_backoff_s=3.0)
    assert [policy.next_delay(t) for t in (0.0, 1.0, 2.0)] == [1.0, 2.0, 3.0]
    assert policy.next_delay(3.0) is None  # a fourth crash within 100 s: give up, let the service manager act
    assert policy.next_delay(150.0) == 1.0  # the window moved on
