"""The dashboard in a real browser: Debian's Chromium driven by Playwright, against uvicorn serving
the dashboard routes on a free port, reading run stores written through RunStore."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import uvicorn
from playwright.sync_api import Browser, Page, sync_playwright
from starlette.applications import Starlette
from starlette.testclient import TestClient

from dashboard.app import dashboard_routes
from dashboard.charts import Series, line_chart, nice_ticks, tick_labels
from gym.protocol import ServerStatus
from store import DB_NAME, RolloutRecord, RunStore, StepRecord, ro_query
from store import metrics as M

SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-output" / "screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
XSS = '<script>alert("xss")</script>'
PHONE = {"width": 390, "height": 844}


# -- realistic run data ----------------------------------------------------------------------


class RunWriter:
    """Builds rollouts the way the trainer does: Gym-shaped results, real SmolLM2 token ids and
    decoded pieces, generation logprobs and trainer logprobs that agree to ~1e-3."""

    SM_ROWS = [("What is 7 + 5? Put your final answer in \\boxed{}.", "12"),
               ("What is 9 + 8? Put your final answer in \\boxed{}.", "17")]
    RIGHT = ["{q} = {a}, so the answer is \\boxed{{{a}}}.", "\\boxed{{{a}}}"]
    WRONG = ["Adding them gives \\boxed{{{w}}}.", "The sum is {a}."]  # wrong number; no box
    WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                   "required": ["city"], "additionalProperties": False}, "strict": True}

    def __init__(self, tokenizer: Any, seed: int = 0):
        self.tok = tokenizer
        self.rng = random.Random(seed)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.encode(text)

    def _logprobs(self, n: int) -> list[float]:
        return [-self.rng.uniform(0.005, 2.5) for _ in range(n)]

    def rollout(self, step: int, env: str, row: int, group: int, calls: list[tuple[list[int], list[int]]],
                result: dict[str, Any], reward: float, *, truncated: bool = False, num_tool_calls: int = 0,
                gap_at: int | None = None) -> RolloutRecord:
        """`calls`: per model call, (context ids not trained on, generated ids)."""
        ids, mask, turn, gen = [], [], [], []
        for k, (ctx, out) in enumerate(calls):
            ids += ctx + out
            mask += [0] * len(ctx) + [1] * len(out)
            turn += [k] * (len(ctx) + len(out))
            gen += [0.0] * len(ctx) + self._logprobs(len(out))
        train = [g + (self.rng.gauss(0, 0.002) if m else 0.0) for g, m in zip(gen, mask)]
        if gap_at is not None:
            train[gap_at] = gen[gap_at] - 1.5
        return RolloutRecord(
            step=step, policy_version=step, env=env, agent=f"{env}_simple_agent", row_index=row,
            group_index=group, row_id=f"{env}/{row}", reward=reward, advantage=0.0, num_turns=len(calls),
            num_model_calls=len(calls), num_tool_calls=num_tool_calls, truncated=truncated, mask_sample=False,
            failure=None, latency_s=round(self.rng.uniform(0.5, 3.0), 3), result=result, token_ids=ids,
            token_text=[self.tok.decode([i]) for i in ids], loss_mask=mask, turn_index=turn, gen_logprobs=gen,
            train_logprobs=train,
        )

    def _output_item(self, prompt: list[int], out: list[int], rec_gen: list[float], **item: Any) -> dict[str, Any]:
        return {**item, "prompt_token_ids": prompt, "generation_token_ids": out, "generation_log_probs": rec_gen}

    def string_match(self, step: int, row: int, group: int, answer: str, truncated: bool = False,
                     gap_at: int | None = None) -> RolloutRecord:
        question, expected = self.SM_ROWS[row % len(self.SM_ROWS)]
        messages = [{"role": "user", "content": question}]
        prompt = self.prompt_ids(messages)
        out = self.encode(answer) + ([] if truncated else [self.tok.eos_token_id])
        boxed = re.findall(r"\\boxed\{([^}]*)\}", answer)
        extracted = boxed[-1] if boxed else None
        reward = 1.0 if extracted == expected and not truncated else 0.0
        r = self.rollout(step, "string_match", row, group, [(prompt, out)], {}, reward, truncated=truncated,
                         gap_at=None if gap_at is None else len(prompt) + gap_at)
        r.result = {
            "responses_create_params": {"input": [{"role": "user", "type": "message",
                                                   "content": [{"type": "input_text", "text": question}]}]},
            "response": {"output": [self._output_item(
                prompt, out, r.gen_logprobs[len(prompt):], id=f"msg_{step}_{row}_{group}", type="message",
                role="assistant", status="incomplete" if truncated else "completed",
                content=[{"type": "output_text", "text": answer, "annotations": []}])]},
            "reward": reward, "expected_answer": expected, "extracted_answer": extracted,
            "extraction_mode": "boxed",
        }
        return r

    def tool_call(self, step: int, row: int, group: int, city: str) -> RolloutRecord:
        messages = [{"role": "system", "content": "You are a helpful personal assistant."},
                    {"role": "user", "content": "what's it like in sf?"}]
        call_text = json.dumps({"name": "get_weather", "arguments": {"city": city}})
        output = json.dumps({"city": city, "weather_description": f"The weather in {city} is cold."})
        answer = f"It is cold in {city} right now."
        p1 = self.prompt_ids(messages)
        o1 = self.encode(f"<tool_call>\n{call_text}\n</tool_call>") + [self.tok.eos_token_id]
        ctx2 = self.encode(f"\n<|im_start|>tool\n{output}<|im_end|>\n<|im_start|>assistant\n")
        o2 = self.encode(answer) + [self.tok.eos_token_id]
        reward = 1.0 if city == "San Francisco" else 0.0
        r = self.rollout(step, "example_single_tool_call", row, group, [(p1, o1), (ctx2, o2)], {}, reward,
                         num_tool_calls=1)
        g1 = r.gen_logprobs[len(p1):len(p1) + len(o1)]
        g2 = r.gen_logprobs[len(p1) + len(o1) + len(ctx2):]
        r.result = {
            "responses_create_params": {"input": [dict(m, type="message") for m in messages],
                                        "tools": [self.WEATHER_TOOL]},
            "response": {"output": [
                self._output_item(p1, o1, g1, type="function_call", name="get_weather", call_id=f"call_{group}",
                                  arguments=json.dumps({"city": city}), status="completed"),
                {"type": "function_call_output", "call_id": f"call_{group}", "output": output},
                self._output_item(p1 + o1 + ctx2, o2, g2, type="message", role="assistant", status="completed",
                                  content=[{"type": "output_text", "text": answer, "annotations": []}]),
            ]},
            "reward": reward,
        }
        return r

    def step_rollouts(self, step: int) -> list[RolloutRecord]:
        out = []
        for row, (question, expected) in enumerate(self.SM_ROWS):
            q = question.split("?")[0].removeprefix("What is ")
            for g in range(4):
                # the policy "learns": group members 0..step answer right
                pattern = (self.RIGHT if g <= step else self.WRONG)[g % 2]
                # the last member of row 1 ran out of tokens: no end-of-turn id, flagged truncated
                out.append(self.string_match(step, row, g, pattern.format(q=q, a=expected, w=int(expected) + 1),
                                             truncated=row == 1 and g == 3))
        for g, city in enumerate(["San Francisco", "Paris"]):
            out.append(self.tool_call(step, 2, g, city))
        return out

    @staticmethod
    def with_advantages(rollouts: list[RolloutRecord]) -> list[RolloutRecord]:
        groups: dict[tuple[str, int], list[RolloutRecord]] = {}
        for r in rollouts:
            groups.setdefault((r.env, r.row_index), []).append(r)
        for members in groups.values():
            mean = sum(r.reward for r in members) / len(members)
            for r in members:
                r.advantage = r.reward - mean
        return rollouts

    def step_record(self, step: int, rollouts: list[RolloutRecord]) -> StepRecord:
        gaps = [abs(t - g) for r in rollouts for t, g, m in zip(r.train_logprobs, r.gen_logprobs, r.loss_mask) if m]
        n_model = sum(sum(r.loss_mask) for r in rollouts)
        metrics = {
            "reward_mean": sum(r.reward for r in rollouts) / len(rollouts),
            "loss": 0.05 / (step + 1) - 0.01, "kl": 0.001 * step, "entropy": 0.9 - 0.1 * step,
            "clip_low_frac": 0.01 * step, "clip_high_frac": 0.02 * step,
            "token_mult_prob_error": sum(math.exp(g) for g in gaps) / len(gaps),
            "gen_kl_error": 1e-5 * (step + 1), "tokens_per_s": n_model / 4.0,
            "time_generation_s": 3.0 + step, "time_training_s": 2.0, "time_weight_sync_s": 0.3,
            "time_logging_s": 0.05, "peak_memory_gib": 6.0 + 0.25 * step,
        }
        for env in sorted({r.env for r in rollouts}):
            rs = [r.reward for r in rollouts if r.env == env]
            metrics[f"reward/{env}_mean"] = sum(rs) / len(rs)
        now = time.time()
        return StepRecord(step=step, policy_version=step, metrics=metrics, started_at=now - 5.3, finished_at=now)

    def eval_rollouts(self, step: int) -> list[RolloutRecord]:
        """Greedy rollouts of the eval rows, as grpo.eval_every stores them: never trained on."""
        out = []
        for row, (question, expected) in enumerate(self.SM_ROWS):
            r = self.string_match(step, row, 0, f"\\boxed{{{expected}}}" if row == 0 else "I do not know.")
            r.kind, r.advantage, r.train_logprobs = "eval", 0.0, []
            out.append(r)
        return out

    def write_step(self, store: RunStore, step: int, rollouts: list[RolloutRecord] | None = None,
                   evaluate: bool = False) -> None:
        rollouts = self.with_advantages(rollouts if rollouts is not None else self.step_rollouts(step))
        record = self.step_record(step, rollouts)
        evals = self.eval_rollouts(step) if evaluate else []
        if evals:
            record.metrics[M.EVAL_REWARD_MEAN] = sum(r.reward for r in evals) / len(evals)
            record.metrics[M.eval_env_reward("string_match")] = record.metrics[M.EVAL_REWARD_MEAN]
        store.write_step(record, rollouts + evals)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from engine.models import DEFAULT_MODEL, resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))


@pytest.fixture(scope="session")
def filled_run(tokenizer, tmp_path_factory) -> tuple[Path, str]:
    """A finished 3-step run written by the store writer with trainer-shaped data (Gym results,
    real SmolLM2 ids, both logprobs), evaluated after step 2: (runs_dir, run_name). The page tests
    run on it in seconds; test_the_dashboard_of_a_real_training_run covers a real run."""
    runs_dir = tmp_path_factory.mktemp("runs")
    writer = RunWriter(tokenizer, seed=0)
    with RunStore.open(runs_dir / "short") as store:
        store.start_run("short", {"grpo": {"steps": 3}}, "smollm2")
        for step in (1, 2, 3):
            writer.write_step(store, step, evaluate=step == 2)
        store.finish_run("finished")
    return runs_dir, "short"


# -- serving and browsing --------------------------------------------------------------------


@contextmanager
def serve(runs_dir: Path, **kwargs: Any) -> Iterator[str]:
    """uvicorn serving the dashboard routes in a background thread; yields the base URL."""
    app = Starlette(routes=dashboard_routes(runs_dir, **kwargs))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def copy_run(src_runs_dir: Path, run: str, dst_runs_dir: Path, new_name: str) -> Path:
    """Copy only the run's database (a real run folder also holds checkpoints)."""
    dst = dst_runs_dir / new_name
    dst.mkdir(parents=True)
    for f in (src_runs_dir / run).glob(DB_NAME + "*"):  # rollouts.db and, if not checkpointed, -wal/-shm
        shutil.copy2(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def site(filled_run, tokenizer, tmp_path_factory):
    """A runs folder with the filled run and a 'crafted' copy whose extra step holds rollouts with
    known content (a <script> answer, a tool call, one token with a large train/gen gap), plus
    Gym servers with log files; served on a free port."""
    src_dir, run = filled_run
    runs_dir = tmp_path_factory.mktemp("site")
    copy_run(src_dir, run, runs_dir, run)
    crafted = run + "-crafted"
    copy_run(src_dir, run, runs_dir, crafted)
    writer = RunWriter(tokenizer, seed=1)
    with RunStore.open(runs_dir / crafted) as store:
        step = (store.last_step() or 0) + 1
        special = [writer.string_match(step, 0, 0, f"{XSS} \\boxed{{12}}"),
                   writer.string_match(step, 0, 1, "7 + 5 = \\boxed{12}", gap_at=3),
                   writer.tool_call(step, 2, 0, "San Francisco")]
        writer.write_step(store, step, special)
    logs = tmp_path_factory.mktemp("gymlogs")
    (logs / "head.log").write_text("INFO head server on :11000\nINFO 4 servers up\n")
    (logs / "string_match.log").write_text("INFO verify ok\nTraceback (most recent call last):\n"
                                           "RuntimeError: <b>port 11002 in use</b>\n")
    servers = [
        ServerStatus("head", "head", True, 0, str(logs / "head.log"), "http://127.0.0.1:11000"),
        ServerStatus("string_match", "resources", False, 2, str(logs / "string_match.log"), None),
    ]
    ids = {name: ro_query(runs_dir / crafted, "SELECT id FROM rollouts WHERE step = ? AND group_index = ? "
                          "AND env = ?", [step, g, env])[1][0][0]
           for name, g, env in [("xss", 0, "string_match"), ("gap", 1, "string_match"),
                                ("tool", 0, "example_single_tool_call")]}
    with serve(runs_dir, gym_status=lambda: servers) as url:
        yield {"url": url, "runs_dir": runs_dir, "run": run, "crafted": crafted, "ids": ids, "servers": servers}


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    # Debian's Chromium only: Playwright must never download a browser.
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert errors == [], f"JavaScript errors: {errors}"


def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def sql(db_dir: Path, query: str, params: list[Any] | None = None) -> list[tuple]:
    return ro_query(db_dir, query, params or [])[1]


# -- pages -----------------------------------------------------------------------------------


def test_overview_shows_status_step_and_charts(site, page: Page):
    run_dir = site["runs_dir"] / site["run"]
    (last_step,), = sql(run_dir, "SELECT max(step) FROM steps")
    (n_steps,), = sql(run_dir, "SELECT count(*) FROM steps")
    (status,), = sql(run_dir, "SELECT status FROM runs")
    page.goto(f"{site['url']}/runs/{site['run']}")
    assert page.inner_text("h1") == site["run"]
    assert page.inner_text("#run-status") == status
    assert page.inner_text("#run-step") == str(last_step)
    for chart in ("reward", "loss", "kl", "entropy", "clip", "mismatch", "gen-kl", "tps", "memory", "time"):
        assert page.locator(f"#chart-{chart} svg").count() == 1, chart
    assert page.get_attribute("#chart-memory", "data-points") == str(n_steps)
    assert page.get_attribute("#chart-reward", "data-points") == str(n_steps)
    assert page.get_attribute("#chart-reward", "data-last-x") == str(last_step)
    assert page.locator("#chart-reward polyline").count() >= 1
    envs = [e for (e,) in sql(run_dir, "SELECT DISTINCT env FROM rollouts ORDER BY env")]
    legend = page.locator("#chart-reward .legend li").all_inner_texts()
    assert all(e in legend for e in envs), (envs, legend)
    assert page.locator("#chart-time rect").count() > 0
    (reward_mean,), = sql(run_dir, "SELECT reward_mean FROM steps WHERE step = ?", [last_step])
    row = page.locator("#last-metrics tr", has_text="reward_mean").first
    assert row.locator("td").inner_text() == f"{reward_mean:.4g}"
    shot(page, "overview")


@pytest.mark.slow
def test_the_dashboard_of_a_real_training_run(short_run, page: Page):
    # short_run: trainer.py on the tiny model with real vLLM and Gym, evaluating after step 2
    run_dir = short_run.runs_dir / short_run.name
    with serve(short_run.runs_dir) as url:
        page.goto(f"{url}/runs/{short_run.name}")
        assert page.inner_text("#run-status") == "finished"
        assert page.get_attribute("#chart-reward", "data-last-x") == "3"
        legend = page.locator("#chart-reward .legend li").all_inner_texts()
        assert "addition" in legend and "eval addition" in legend, legend
        (rid,), = sql(run_dir, "SELECT min(id) FROM rollouts WHERE step = 3")
        page.goto(f"{url}/runs/{short_run.name}/rollouts/{rid}")
        n_tokens = sql(run_dir, "SELECT count(*) FROM tokens WHERE rollout_id = ?", [rid])[0][0]
        assert page.locator(".tokens .tok").count() == n_tokens
        page.goto(f"{url}/runs/{short_run.name}/rollouts?kind=eval")
        (n_eval,), = sql(run_dir, "SELECT count(*) FROM rollouts WHERE kind = 'eval'")
        assert page.locator("#rollouts-table tbody tr").count() == n_eval == 2
        shot(page, "real-run-eval-rollouts")


def test_an_unhealthy_step_shows_a_warning_on_the_overview(filled_run, tokenizer, tmp_path, page: Page):
    src_dir, run = filled_run
    copy_run(src_dir, run, tmp_path, run)
    with serve(tmp_path) as url:
        page.goto(f"{url}/runs/{run}")
        assert page.locator("#health-alerts").count() == 0      # a healthy run warns of nothing
        writer = RunWriter(tokenizer, seed=3)
        with RunStore.open(tmp_path / run) as store:
            step = store.last_step() + 1
            rollouts = writer.with_advantages(writer.step_rollouts(step))
            record = writer.step_record(step, rollouts)
            record.metrics.update({M.TOKEN_MULT_PROB_ERROR: 1.2, M.GYM_RESTARTS: 1.0})
            store.write_step(record, rollouts)
        page.wait_for_selector("#health-alerts", timeout=15_000)   # the live poll brings it
        items = page.locator("#health-alerts li")
        assert sorted(items.evaluate_all("els => els.map(e => e.dataset.metric)")) == \
            sorted([M.TOKEN_MULT_PROB_ERROR, M.GYM_RESTARTS])
        assert f"step {step}: token_mult_prob_error 1.2000 > 1.05" in page.inner_text("#health-alerts")
        assert page.locator("#health-alerts").is_visible()
        shot(page, "health-alert")


def test_home_shows_the_newest_run(site, page: Page):
    from dashboard.data import run_names

    page.goto(site["url"] + "/")
    assert page.inner_text("h1") == run_names(site["runs_dir"])[0]


def test_chart_updates_when_a_step_is_written(filled_run, tokenizer, tmp_path, page: Page):
    src_dir, run = filled_run
    copy_run(src_dir, run, tmp_path, run)
    with serve(tmp_path) as url:
        page.goto(f"{url}/runs/{run}")
        store = RunStore.open(tmp_path / run)
        last = store.last_step()
        before_points = int(page.get_attribute("#chart-reward", "data-points"))
        assert page.get_attribute("#chart-reward", "data-last-x") == str(last)
        shot(page, "live-before")
        RunWriter(tokenizer, seed=7).write_step(store, last + 1)
        store.close()
        page.wait_for_selector(f'#chart-reward[data-last-x="{last + 1}"]', timeout=15_000)
        assert int(page.get_attribute("#chart-reward", "data-points")) == before_points + 1
        assert page.inner_text("#run-step") == str(last + 1)
        assert page.get_attribute("#chart-loss", "data-last-x") == str(last + 1)
        shot(page, "live-after")


def test_rollout_browser_filters(site, page: Page):
    run, run_dir = site["run"], site["runs_dir"] / site["run"]
    (step,), = sql(run_dir, "SELECT max(step) FROM steps")
    env = sql(run_dir, "SELECT env FROM rollouts GROUP BY env ORDER BY count(*) DESC LIMIT 1")[0][0]
    page.goto(f"{site['url']}/runs/{run}/rollouts")
    (total,), = sql(run_dir, "SELECT count(*) FROM rollouts")
    assert page.inner_text("#rollout-count").startswith(f"{total} rollouts match")
    page.select_option("select[name=step]", str(step))
    page.select_option("select[name=env]", env)
    page.fill("input[name=min_reward]", "0.5")
    page.click("form.filters button")
    page.wait_for_url(re.compile(r"min_reward=0\.5"))
    expected = sql(run_dir, "SELECT id, reward FROM rollouts WHERE step = ? AND env = ? AND reward >= 0.5 "
                            "ORDER BY id", [step, env])
    rows = page.locator("#rollouts-table tbody tr")
    assert rows.count() == len(expected)
    assert [int(t) for t in page.locator("#rollouts-table tbody tr td:first-child").all_inner_texts()] == \
        [i for i, _ in expected]
    shot(page, "rollouts-filtered")

    page.goto(f"{site['url']}/runs/{run}/rollouts?truncated=1")
    (n_trunc,), = sql(run_dir, "SELECT count(*) FROM rollouts WHERE truncated = 1")
    assert page.locator("#rollouts-table tbody tr").count() == min(n_trunc, 100)


def test_eval_during_training_has_its_own_reward_line_and_rollout_filter(site, page: Page):
    run, run_dir = site["run"], site["runs_dir"] / site["run"]
    evals = sql(run_dir, "SELECT id FROM rollouts WHERE kind = 'eval' ORDER BY id")
    assert evals  # the run evaluated after step 2
    page.goto(f"{site['url']}/runs/{run}")
    legend = page.locator("#chart-reward .legend li").all_inner_texts()
    for (env,) in sql(run_dir, "SELECT DISTINCT env FROM rollouts WHERE kind = 'eval'"):
        assert f"eval {env}" in legend, legend
    page.goto(f"{site['url']}/runs/{run}/rollouts")
    page.select_option("select[name=kind]", "eval")
    page.click("form.filters button")
    page.wait_for_url(re.compile(r"kind=eval"))
    assert [int(t) for t in page.locator("#rollouts-table tbody tr td:first-child").all_inner_texts()] == \
        [i for (i,) in evals]
    shot(page, "rollouts-eval")


def test_rollout_page_shows_the_conversation_turn_by_turn(site, page: Page):
    page.goto(f"{site['url']}/runs/{site['crafted']}/rollouts/{site['ids']['tool']}")
    turns = page.locator("#conversation .msg")
    assert turns.count() == 5  # system, user, tool call, tool result, answer
    heads = [h.strip() for h in page.locator("#conversation .msg-head").all_inner_texts()]
    assert heads[0].startswith("system") and heads[1].startswith("user")
    assert heads[2].startswith("tool call get_weather") and heads[3].startswith("tool result")
    assert heads[4].startswith("assistant")
    assert '"city": "San Francisco"' in turns.nth(2).inner_text()
    assert "The weather in San Francisco is cold." in turns.nth(3).inner_text()
    assert turns.nth(4).inner_text().endswith("It is cold in San Francisco right now.")
    assert page.inner_text("#rollout-reward") == "1"
    assert page.locator("#verifier th").first.inner_text() == "reward"
    assert page.locator(".tokens .turn-mark").count() == 1  # the second model call starts a new turn
    shot(page, "rollout-tool-call")


def test_token_view_shows_ids_and_logprobs(site, page: Page):
    run_dir = site["runs_dir"] / site["run"]
    (rid,), = sql(run_dir, "SELECT min(id) FROM rollouts WHERE step = (SELECT max(step) FROM rollouts)")
    tokens = sql(run_dir, "SELECT position, token_id, gen_logprob, train_logprob, is_model FROM tokens "
                          "WHERE rollout_id = ? ORDER BY position", [rid])
    page.goto(f"{site['url']}/runs/{site['run']}/rollouts/{rid}")
    spans = page.locator(".tokens .tok")
    assert spans.count() == len(tokens)
    titles = spans.evaluate_all("els => els.map(e => e.title)")
    ids = spans.evaluate_all("els => els.map(e => Number(e.dataset.id))")
    assert ids == [t[1] for t in tokens]
    for (pos, tid, gen, train, _), title in zip(tokens, titles):
        shown = "n/a" if train is None else f"{train:.4f}"
        assert title.startswith(f"#{pos} id {tid} | gen {gen:.4f} | train {shown}"), title
    first_model = next(t for t in tokens if t[4])
    span = page.locator(f'.tok[data-pos="{first_model[0]}"]')
    span.hover()
    assert span.get_attribute("style").startswith("background:hsl(")
    assert page.locator(".tok.ctx").count() == sum(1 for t in tokens if not t[4])
    shot(page, "tokens-gen")


def test_token_gap_view_marks_the_disagreeing_token(site, page: Page):
    run_dir = site["runs_dir"] / site["crafted"]
    rid = site["ids"]["gap"]
    (pos, gap), = sql(run_dir, "SELECT position, abs(train_logprob - gen_logprob) FROM tokens WHERE rollout_id = ? "
                               "AND is_model = 1 ORDER BY 2 DESC LIMIT 1", [rid])
    assert gap == pytest.approx(1.5)
    page.goto(f"{site['url']}/runs/{site['crafted']}/rollouts/{rid}")
    page.click("#view-gap")
    page.wait_for_selector('.tokens[data-view="gap"]')
    assert page.get_attribute(f'.tok[data-pos="{pos}"]', "style") == "background:hsl(0,85%,55%)"
    assert "gap 1.5000" in page.get_attribute(f'.tok[data-pos="{pos}"]', "title")
    shot(page, "tokens-gap")


def test_script_in_model_output_shows_as_text(site, page: Page):
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"{site['url']}/runs/{site['crafted']}/rollouts/{site['ids']['xss']}")
    answer = page.locator("#conversation .msg.role-assistant .msg-body")
    assert answer.inner_text().startswith(XSS)
    assert answer.is_visible()
    page.wait_for_timeout(300)
    assert dialogs == []
    assert page.evaluate("document.querySelectorAll('script').length") == 1  # htmx only
    assert page.locator(".tokens").inner_text().count("script") >= 2
    shot(page, "rollout-script-as-text")


def test_gym_panel_shows_servers_and_log_tails(site, page: Page):
    page.goto(f"{site['url']}/gym")
    rows = page.locator("#gym-table tbody tr")
    assert rows.count() == 2
    assert rows.nth(0).locator(".pill").inner_text() == "up"
    assert rows.nth(1).locator(".pill").inner_text() == "down"
    assert rows.nth(1).locator("td").nth(3).inner_text() == "2"
    logs = page.locator("pre.log").all_inner_texts()
    assert logs[0].endswith("INFO 4 servers up")
    assert logs[1].endswith("RuntimeError: <b>port 11002 in use</b>")
    shot(page, "gym")


def test_sql_console_runs_reads_and_refuses_writes(site, page: Page):
    run_dir = site["runs_dir"] / site["run"]
    (n,), = sql(run_dir, "SELECT count(*) FROM rollouts")
    page.goto(f"{site['url']}/sql?run={site['run']}")
    page.fill("textarea[name=q]", "SELECT step, reward_mean FROM steps ORDER BY step")
    page.click("#sql-form button")
    page.wait_for_selector("#sql-table")
    steps = sql(run_dir, "SELECT step, reward_mean FROM steps ORDER BY step")
    assert page.locator("#sql-table tbody tr").count() == len(steps)
    assert page.locator("#sql-table thead th").all_inner_texts() == ["step", "reward_mean"]

    page.fill("textarea[name=q]", "DELETE FROM rollouts")
    page.click("#sql-form button")
    error = page.locator("#sql-error")
    error.wait_for()
    assert error.is_visible() and error.inner_text().startswith("refused")
    shot(page, "sql-refused")
    page.fill("textarea[name=q]", "SELECT 1; DROP TABLE tokens")
    page.click("#sql-form button")
    page.wait_for_function("document.querySelector('#sql-error').innerText.includes('one statement')")
    assert sql(run_dir, "SELECT count(*) FROM rollouts") == [(n,)]


def test_sql_console_documented_examples_run(site, page: Page):
    page.goto(f"{site['url']}/sql?run={site['run']}")
    links = page.locator("ul.examples a")
    assert links.count() == 6
    for i in range(links.count()):
        page.goto(f"{site['url']}/sql?run={site['run']}")
        page.locator("ul.examples a").nth(i).click()
        page.wait_for_selector("#sql-table, #sql-error")
        assert page.locator("#sql-error").count() == 0, page.inner_text("#sql-error")
        assert page.locator("#sql-table tbody tr").count() > 0


def test_runs_list_and_compare(site, page: Page):
    page.goto(f"{site['url']}/runs")
    names = page.locator("#runs-table tbody td:first-child").all_inner_texts()
    assert sorted(names) == sorted([site["run"], site["crafted"]])
    page.select_option("select[name=a]", site["run"])
    page.select_option("select[name=b]", site["crafted"])
    page.click("form.inline button")
    page.wait_for_selector("#chart-compare")
    assert page.locator("#chart-compare .legend li").all_inner_texts() == [site["run"], site["crafted"]]
    assert page.locator("#chart-compare polyline").count() == 2
    (last,), = sql(site["runs_dir"] / site["crafted"], "SELECT max(step) FROM steps")
    assert page.get_attribute("#chart-compare", "data-last-x") == str(last)
    shot(page, "compare")


@pytest.mark.parametrize("path", ["/runs/{run}", "/runs/{run}/rollouts", "/runs/{run}/rollouts/{rid}", "/gym",
                                  "/sql?run={run}&q=SELECT+id,+env,+reward,+result+FROM+rollouts+LIMIT+5", "/runs"])
def test_phone_width_has_no_horizontal_scroll(site, browser: Browser, path: str):
    ctx = browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
    page = ctx.new_page()
    page.goto(site["url"] + path.format(run=site["crafted"], rid=site["ids"]["tool"]))
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    assert page.locator("nav").is_visible()
    name = re.sub(r"[^a-z]+", "-", path.split("?")[0].replace("{run}", "run").replace("{rid}", "id")).strip("-")
    shot(page, f"phone-{name or 'home'}")
    ctx.close()


def test_database_reads_do_not_block_the_event_loop(site):
    """A query held for its full 5 s time limit runs in the thread pool; other pages still answer."""
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=site["url"], timeout=30) as client:
        slow = pool.submit(client.post, "/sql", data={"run": site["run"], "q": endless},
                           headers={"HX-Request": "true"})
        time.sleep(0.5)
        t0 = time.monotonic()
        r = client.get(f"/runs/{site['run']}/live")
        assert r.status_code == 200 and time.monotonic() - t0 < 2.0
        assert not slow.done()
        assert "interrupted after its 5 s limit" in slow.result().text


def test_unknown_run_and_rollout_are_404(site):
    with httpx.Client(base_url=site["url"]) as client:
        assert client.get("/runs/nope").status_code == 404
        assert client.get("/runs/..%2F..%2Fetc/rollouts").status_code == 404
        assert client.get(f"/runs/{site['run']}/rollouts/999999").status_code == 404
        assert client.get("/static/app.py").status_code == 404


def test_token_protects_every_route(filled_run):
    runs_dir, run = filled_run
    client = TestClient(Starlette(routes=dashboard_routes(runs_dir, token="s3cret")))
    for path in ["/", f"/runs/{run}", f"/runs/{run}/live", f"/runs/{run}/rollouts/1", "/sql?q=SELECT+1",
                 "/static/htmx.min.js", "/gym", "/compare?a=x&b=y", "/runs"]:
        assert client.get(path).status_code == 401, path
        assert client.get(path, params={"token": "wrong"}).status_code == 401, path
    r = client.get("/", params={"token": "s3cret"})
    assert r.status_code == 200 and client.cookies.get("grpo_dashboard_token") == "s3cret"
    assert client.get(f"/runs/{run}/live").status_code == 200  # the cookie now carries the token
    bare = TestClient(Starlette(routes=dashboard_routes(runs_dir, token="s3cret")))
    assert bare.get("/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_token_in_the_browser_keeps_live_updates_working(filled_run, page: Page):
    runs_dir, run = filled_run
    with serve(runs_dir, token="s3cret") as url:
        statuses: list[int] = []
        page.on("response", lambda r: statuses.append(r.status) if "/live" in r.url else None)
        page.goto(f"{url}/runs/{run}?token=s3cret")
        page.wait_for_timeout(2600)  # one poll at least
        assert statuses and set(statuses) == {200}
        page.click("nav >> text=Rollouts")
        page.wait_for_selector("#rollouts-table")


# -- charts without a browser ----------------------------------------------------------------


def test_tick_labels_are_exact_and_distinct():
    assert tick_labels(nice_ticks(0, 8.6)) == ["0.0", "2.5", "5.0", "7.5"]
    assert tick_labels(nice_ticks(1.0, 1.04)) == ["1.00", "1.02", "1.04"]
    assert tick_labels(nice_ticks(0, 3e-5)) == ["0", "1.0e-05", "2.0e-05", "3.0e-05"]
    assert tick_labels(nice_ticks(0, 120_000)) == ["0", "50000", "100000"]


def test_line_chart_breaks_at_missing_values_and_escapes_names():
    svg = str(line_chart("c", "<i>t</i>", [Series("<b>env</b>", [(0, 1.0), (1, None), (2, 2.0), (3, 3.0)])]))
    assert svg.count("<polyline") == 1  # 0 stands alone; 2-3 is one line
    assert 'data-points="4"' in svg and 'data-last-x="3"' in svg
    assert "&lt;b&gt;env&lt;/b&gt;" in svg and "<b>" not in svg and "&lt;i&gt;t&lt;/i&gt;" in svg


def test_empty_chart_says_so():
    assert "no data yet" in str(line_chart("c", "Loss", [Series("loss", [])]))


def test_a_store_from_before_eval_rollouts_lists_every_rollout_as_train(tmp_path):
    import sqlite3

    from dashboard.data import RolloutFilter, list_rollouts
    from tests.test_store import rollout, step_record

    with RunStore.open(tmp_path) as s:
        s.write_step(step_record(1), [rollout(1, "sm", 1.0), rollout(1, "sm", 0.0, group=1)])
    with sqlite3.connect(tmp_path / DB_NAME) as c:
        c.execute("ALTER TABLE rollouts DROP COLUMN kind")
    rows, total = list_rollouts(tmp_path / DB_NAME, RolloutFilter(kind="train"))
    assert (total, [r["kind"] for r in rows]) == (2, ["train", "train"])
    assert list_rollouts(tmp_path / DB_NAME, RolloutFilter(kind="eval")) == ([], 0)
