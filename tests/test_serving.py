"""A server that is down, stalls or answers garbage gives a clear error after a bounded, logged retry — never a
hang, and never a silent score. The endpoints here are small HTTP servers that misbehave on purpose; a real vLLM
server is tested in test_served.py."""

import http.server
import socket
import threading
import time

import pytest

from dlm_rl.serving import Endpoint, ServerError
from rewards.judge import LLMJudge, as_text, parse_score


class Misbehaving(http.server.BaseHTTPRequestHandler):
    """Replies to every request as the server's `behaviour` says: 'stall', 'garbage', 'error500', 'refuse400',
    'no_choices' or 'chat' (a well-formed chat reply whose content is the server's `content`)."""

    def do_GET(self):
        self._reply()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.hits += 1
        self._reply()

    def _reply(self):
        behaviour = self.server.behaviour
        if behaviour == "stall":
            time.sleep(30)
            return
        status, body = {
            "garbage": (200, b"<html>not json</html>"),
            "error500": (500, b'{"error": "overloaded"}'),
            "refuse400": (400, b'{"error": "bad request"}'),
            "no_choices": (200, b'{"id": "x"}'),
            "chat": (200, ('{"choices": [{"index": 0, "message": {"content": "%s"}}]}' % self.server.content).encode()),
        }[behaviour]
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    servers = []

    def start(behaviour: str, content: str = "") -> str:
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
        httpd.daemon_threads = True
        httpd.behaviour, httpd.content, httpd.hits = behaviour, content, 0
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        start.last = httpd
        return f"http://127.0.0.1:{httpd.server_address[1]}/v1"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def test_a_stalled_server_times_out_after_a_bounded_number_of_logged_retries(server, caplog):
    url = server("stall")
    judge = LLMJudge(url, "judge", timeout=0.5, retries=2)
    judge.endpoint.backoff = 0.1
    start = time.monotonic()
    with pytest.raises(ServerError, match=r"failed 3 times \(last: no reply within 0.5 s\)"):
        judge(["What is 2+2?"], ["4"])
    assert time.monotonic() - start < 5  # 3 × 0.5 s and 0.1 + 0.2 s of backoff, not the stall's 30 s
    assert [r.message for r in caplog.records].count("judge: POST /chat/completions: no reply within 0.5 s; "
                                                    "retry 1 of 2 in 0.1 s") == 1


def test_a_server_that_is_down_is_a_clear_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = Endpoint(f"http://127.0.0.1:{port}/v1", retries=1, backoff=0.01, name="judge")
    with pytest.raises(ServerError, match=r"judge: POST /completions failed 2 times \(last: cannot reach it"):
        endpoint.completions({"prompt": "x"})


@pytest.mark.parametrize("behaviour, message, attempts", [
    ("garbage", "something other than JSON: '<html>not json</html>'", 1),
    ("refuse400", "refused POST /completions: HTTP 400", 1),
    ("error500", r"failed 3 times \(last: HTTP 500\)", 3),
    ("no_choices", "replied without choices", 1),
])
def test_garbage_and_refusals_are_clear_errors_and_only_server_failures_are_retried(server, behaviour, message,
                                                                                   attempts):
    url = server(behaviour)
    endpoint = Endpoint(url, retries=2, backoff=0.01)
    with pytest.raises(ServerError, match=message):
        endpoint.completions({"prompt": "x"})
    assert server.last.hits == attempts


def test_errors_and_logs_never_name_the_url_or_the_key(server, caplog):
    url = server("error500")
    endpoint = Endpoint(url, api_key="sk-secret", retries=1, backoff=0.01, name="judge")
    with pytest.raises(ServerError) as error:
        endpoint.completions({"prompt": "x"})
    text = str(error.value) + repr(endpoint) + " ".join(r.getMessage() for r in caplog.records)
    assert "127.0.0.1" not in text and "sk-secret" not in text


@pytest.mark.parametrize("reply, score", [("7", 0.7), ("Score: 10/10", 1.0), ("0", 0.0), ("8.5 out of 10", 0.85),
                                          ("eleven", None), ("11", None), ("-1", None), ("", None)])
def test_the_first_number_in_range_is_the_score_and_anything_else_is_no_score(reply, score):
    assert parse_score(reply, 10) == (pytest.approx(score) if score is not None else None)


def test_an_unparseable_reply_gives_no_score_with_a_warning_quoting_it(server, caplog):
    judge = LLMJudge(server("chat", content="I cannot grade this"), "judge")
    assert judge(["q"], ["a"]) == [None]
    assert "no score in [0, 10] in the reply for sample 0 (no reward): 'I cannot grade this'" in caplog.text


def test_identical_requests_are_sent_once_and_counted_as_cache_hits(server):
    url = server("chat", content="6")
    judge = LLMJudge(url, "judge")
    assert judge(["q1", "q2", "q1"], ["a", "a", "a"]) == [0.6, 0.6, 0.6]
    assert (judge.requests, judge.cache_hits) == (2, 1)
    assert judge(["q2"], ["a"]) == [0.6]
    assert (judge.requests, judge.cache_hits) == (2, 2)


def test_the_judge_refuses_a_rubric_without_the_completion_at_construction():
    with pytest.raises(ValueError, match=r"must contain \{completion\}"):
        LLMJudge("http://127.0.0.1:1/v1", "judge", rubric="Rate {prompt}")


def test_chat_messages_are_judged_as_text():
    assert as_text([{"role": "assistant", "content": "Paris."}]) == "Paris."
    assert as_text([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]) == \
        "system: Be brief.\nuser: Hi"


@pytest.mark.parametrize("settings, message", [
    (dict(method="tracerl"), "rollout_server cannot serve method 'tracerl'"),
    (dict(method="justgrpo", shrink=1), "rollout_server cannot serve method 'justgrpo'"),
    (dict(method="diffu_grpo", igpo=True), "rollout_server cannot serve igpo"),
    (dict(method="diffu_grpo", use_lora=False), "rollout_server needs use_lora: true"),
    (dict(method="diffu_grpo", rollout_actors=2), "give rollout_server or rollout_actors, not both"),
    (dict(method="diffu_grpo", rollout_server="localhost:8000"), "must be a URL starting with http://"),
])
def test_a_rollout_server_is_refused_at_parse_time_where_it_cannot_serve(settings, message):
    from dlm_rl.trainers.tracerl import TraceRLConfig

    settings = {"use_lora": True, "rollout_server": "http://127.0.0.1:1/v1", **settings}
    with pytest.raises(ValueError, match=message):
        TraceRLConfig(model="testbed:addition3-base", dataset_name="addition3", **settings)


def test_vrpo_on_a_dataset_of_pairs_refuses_a_rollout_server(tmp_path):
    import json

    from dlm_rl.trainers.vrpo import VRPOConfig

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) + "\n"
                             for i in range(40)))
    with pytest.raises(ValueError, match="rollout_server samples on-policy pairs"):
        VRPOConfig(model="testbed:addition3-base", dataset_path=str(pairs), gen_length=8, use_lora=True,
                   rollout_server="http://127.0.0.1:1/v1")


def test_a_sampling_judge_sends_every_request_and_caches_nothing(server):
    judge = LLMJudge(server("chat", content="3"), "judge", temperature=1.0)
    assert judge(["q", "q"], ["a", "a"]) == [0.3, 0.3]
    assert judge(["q"], ["a"]) == [0.3]
    assert (judge.requests, judge.cache_hits, len(judge.cache)) == (3, 0, 0)
    assert server.last.hits == 3


def test_a_reward_model_reply_without_one_score_is_a_clear_error(server):
    from rewards.reward_model import ServedRewardModel

    reward = ServedRewardModel(server("no_choices"), "rm")
    with pytest.raises(ServerError, match="a pooling reply without one score"):
        reward(["q"], ["a"])


@pytest.mark.parametrize("reward, variable", [("rewards.judge:judge", "DLM_RL_JUDGE_URL"),
                                              ("rewards.reward_model:reward_model", "DLM_RL_REWARD_MODEL_URL")])
def test_a_recipe_reward_without_its_server_url_says_which_variable_to_set(reward, variable, monkeypatch):
    from dlm_rl.reward_functions import load_reward

    monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ValueError, match=f"{reward} needs {variable}"):
        load_reward(reward)(["q"], ["a"])
