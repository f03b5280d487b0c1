"""The dashboard's routes. The trainer mounts them in the same Starlette app (and event loop) as the
policy server, so every database read and every page build runs in the thread pool."""

from __future__ import annotations

import hmac
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable
from urllib.parse import parse_qs, quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from dashboard import charts, data
from store import DB_NAME, QueryError, forensic_queries, ro_query
from store import metrics as M
from store.records import ROLLOUT_KINDS

if TYPE_CHECKING:
    from gym.protocol import ServerStatus  # only its attributes are read: name, kind, up, restarts, log_path, url

HERE = Path(__file__).resolve().parent
STATIC = {"htmx.min.js": "text/javascript", "style.css": "text/css"}
COOKIE = "grpo_dashboard_token"
POLL_S = 2
SQL_TIMEOUT_S = 5.0
SQL_MAX_ROWS = 500

Endpoint = Callable[[Request], Awaitable[Response]]


def _elapsed(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = int(seconds)
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _ago(ts: float | None) -> str:
    return "–" if ts is None else _elapsed(max(0.0, time.time() - ts)) + " ago"  # clocks may disagree


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}"
    return str(v)


def _gen_color(logprob: float | None) -> str:
    """Red (unlikely) to green (certain) by the token's probability exp(logprob)."""
    if logprob is None:
        return "transparent"
    p = math.exp(min(0.0, logprob))
    return f"hsl({120 * p:.0f},75%,82%)"


def _gap_color(gap: float | None) -> str:
    """White (train = gen) to red (|train - gen| >= 0.5 nats)."""
    if gap is None:
        return "transparent"
    t = min(1.0, gap / 0.5)
    return f"hsl(0,85%,{100 - 45 * t:.0f}%)"


def _token_title(t: data.Token) -> str:
    gap = t.gap
    return (f"#{t.position} id {t.token_id} | gen {_lp(t.gen)} | train {_lp(t.train)}"
            f" | gap {_lp(gap)} | turn {t.turn}" + ("" if t.is_model else " | not trained"))


def _lp(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _shown(text: str) -> str:
    # Make invisible pieces visible: a newline token shows ↵ then breaks the line.
    if text == "":
        return "∅"
    return text.replace("\n", "↵\n")


def _cell(v: Any, limit: int = 400) -> str:
    """A SQL result value as shown: NULL, blob sizes, long text (a rollout's result JSON) clipped."""
    if v is None:
        return "NULL"
    if isinstance(v, bytes):
        return f"<blob, {len(v)} bytes>"
    text = str(v)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} chars)"


class Dashboard:
    def __init__(self, runs_dir: Path, gym_status: Callable[[], list[ServerStatus]] | None, token: str | None):
        self.runs_dir = Path(runs_dir)
        self.gym_status = gym_status
        self.token = token or None
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"),
                               autoescape=select_autoescape(default=True, default_for_string=True))
        self.env.filters.update(q=lambda s: quote(str(s), safe=""), num=_num, elapsed=_elapsed, ago=_ago,
                                shown=_shown)

    # -- plumbing ------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        g = self._guard
        return [
            Route("/", g(self.home), name="dashboard_home"),
            Route("/runs", g(self.runs), name="dashboard_runs"),
            Route("/runs/{run}", g(self.overview), name="dashboard_run"),
            Route("/runs/{run}/live", g(self.live), name="dashboard_run_live"),
            Route("/runs/{run}/rollouts", g(self.rollouts), name="dashboard_rollouts"),
            Route("/runs/{run}/rollouts/{rid:int}", g(self.rollout), name="dashboard_rollout"),
            Route("/runs/{run}/rollouts/{rid:int}/tokens", g(self.tokens), name="dashboard_tokens"),
            Route("/compare", g(self.compare), name="dashboard_compare"),
            Route("/gym", g(self.gym), name="dashboard_gym"),
            Route("/gym/live", g(self.gym_live), name="dashboard_gym_live"),
            Route("/sql", g(self.sql), methods=["GET", "POST"], name="dashboard_sql"),
            Route("/static/{name}", g(self.static), name="dashboard_static"),
        ]

    def _guard(self, endpoint: Endpoint) -> Endpoint:
        """With a token configured, every route wants it: ?token=, the cookie set from it, or a
        Bearer header. A valid ?token= sets the cookie so htmx's follow-up requests carry it."""
        if self.token is None:
            return endpoint
        expected = self.token.encode()

        async def guarded(request: Request) -> Response:
            from_query = request.query_params.get("token")
            auth = request.headers.get("authorization", "")
            bearer = auth[7:] if auth.lower().startswith("bearer ") else ""
            supplied = from_query or request.cookies.get(COOKIE) or bearer
            if not supplied or not hmac.compare_digest(supplied.encode(), expected):
                return HTMLResponse("<!doctype html><title>401</title><h1>401: token required</h1>"
                                    "<p>Open this page with <code>?token=…</code>.</p>", status_code=401)
            response = await endpoint(request)
            if from_query:
                response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
            return response

        return guarded

    def _render(self, request: Request, template: str, **ctx: Any) -> str:
        base = request.scope.get("root_path", "")
        return self.env.get_template(template).render(
            base=base, poll_s=POLL_S, gym_enabled=self.gym_status is not None, **ctx)

    async def _page(self, request: Request, build: Callable[[], tuple[str, dict[str, Any]] | Response]) -> Response:
        """Run `build` (database reads) and the template render in the thread pool."""
        def work() -> Response:
            out = build()
            if isinstance(out, Response):
                return out
            template, ctx = out
            return HTMLResponse(self._render(request, template, **ctx))
        return await run_in_threadpool(work)

    def _not_found(self, request: Request, what: str) -> Response:
        return HTMLResponse(self._render(request, "error.html", runs=data.run_names(self.runs_dir), run=None,
                                         message=what), status_code=404)

    # -- pages ---------------------------------------------------------------------------------

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return Response("not found", status_code=404)
        return FileResponse(HERE / "static" / name, media_type=STATIC[name],
                            headers={"Cache-Control": "max-age=300"})

    async def home(self, request: Request) -> Response:
        def build():
            names = data.run_names(self.runs_dir)
            if not names:
                return "empty.html", {"runs": [], "run": None, "runs_dir": str(self.runs_dir)}
            return self._overview_ctx(names[0], names)
        return await self._page(request, build)

    async def overview(self, request: Request) -> Response:
        run = request.path_params["run"]

        def build():
            names = data.run_names(self.runs_dir)
            if run not in names:
                return self._not_found(request, f"no run named {run!r}")
            return self._overview_ctx(run, names)
        return await self._page(request, build)

    def _overview_ctx(self, run: str, names: list[str]) -> tuple[str, dict[str, Any]]:
        return "overview.html", {"runs": names, "run": run, **self._live_ctx(run)}

    async def live(self, request: Request) -> Response:
        run = request.path_params["run"]

        def build():
            if data.run_db(self.runs_dir, run) is None:
                return self._not_found(request, f"no run named {run!r}")
            return "live.html", {"run": run, **self._live_ctx(run)}
        return await self._page(request, build)

    def _live_ctx(self, run: str) -> dict[str, Any]:
        summary = data.read_run(self.runs_dir, run)
        steps = data.read_steps(summary.db)
        env_rewards = data.env_reward_series(summary.db, steps)
        eval_rewards = data.eval_reward_series(steps)
        m = lambda key: data.metric_series(steps, key)  # noqa: E731
        S = charts.Series
        figs = [
            charts.line_chart("chart-reward", "Reward",
                              [S("mean", m(M.REWARD_MEAN))] + [S(env, pts) for env, pts in env_rewards.items()]
                              + [S(f"eval {env}", pts) for env, pts in eval_rewards.items()]),
            charts.line_chart("chart-loss", "Loss", [S("loss", m(M.LOSS))]),
            charts.line_chart("chart-kl", "KL to reference", [S("kl", m(M.KL))]),
            charts.line_chart("chart-entropy", "Entropy", [S("entropy", m(M.ENTROPY))]),
            charts.line_chart("chart-clip", "Clip fraction",
                              [S("low", m(M.CLIP_LOW_FRAC)), S("high", m(M.CLIP_HIGH_FRAC))]),
            charts.line_chart("chart-mismatch", "token_mult_prob_error (1.0 = exact)",
                              [S("token_mult_prob_error", m(M.TOKEN_MULT_PROB_ERROR))]),
            charts.line_chart("chart-gen-kl", "gen_kl_error", [S("gen_kl_error", m(M.GEN_KL_ERROR))]),
            charts.line_chart("chart-tps", "Tokens / s", [S("tokens/s", m(M.TOKENS_PER_S))]),
            charts.line_chart("chart-memory", "Peak memory (GiB: RSS on CPU, allocated on GPU)",
                              [S("peak GiB", m(M.PEAK_MEMORY_GIB))]),
            charts.stacked_bars("chart-time", "Step time (s)", [
                S("generation", m(M.TIME_GENERATION_S)), S("training", m(M.TIME_TRAINING_S)),
                S("weight sync", m(M.TIME_WEIGHT_SYNC_S)), S("logging", m(M.TIME_LOGGING_S))]),
        ]
        last = steps[-1].metrics if steps else {}
        return {"summary": summary, "charts": figs, "last_metrics": last, "alerts": data.health_alerts(steps)}

    async def runs(self, request: Request) -> Response:
        def build():
            return "runs.html", {"runs": data.run_names(self.runs_dir), "run": None,
                                 "summaries": data.list_runs(self.runs_dir)}
        return await self._page(request, build)

    async def compare(self, request: Request) -> Response:
        a, b = request.query_params.get("a", ""), request.query_params.get("b", "")

        def build():
            names = data.run_names(self.runs_dir)
            chosen = [r for r in (a, b) if r in names]
            series = [charts.Series(r, data.reward_curve(self.runs_dir / r / DB_NAME)) for r in dict.fromkeys(chosen)]
            missing = [r for r in (a, b) if r and r not in names]
            return "compare.html", {"runs": names, "run": None, "a": a, "b": b, "missing": missing,
                                    "chart": charts.line_chart("chart-compare", "Reward (mean per step)", series)}
        return await self._page(request, build)

    async def rollouts(self, request: Request) -> Response:
        run = request.path_params["run"]
        qp = request.query_params
        errors: list[str] = []

        def parse(name: str, kind: type) -> Any:
            raw = qp.get(name, "").strip()
            if raw == "":
                return None
            try:
                return kind(raw)
            except ValueError:
                errors.append(f"{name}: {raw!r} is not a number")
                return None

        trunc = qp.get("truncated", "")
        f = data.RolloutFilter(
            step=parse("step", int), env=qp.get("env") or None, min_reward=parse("min_reward", float),
            max_reward=parse("max_reward", float), truncated={"1": True, "0": False}.get(trunc),
            kind=qp.get("kind") if qp.get("kind") in ROLLOUT_KINDS else None,
            sort=qp.get("sort", "id") if qp.get("sort") in data.SORTS else "id",
            offset=max(0, parse("offset", int) or 0), limit=100,
        )

        def build():
            db = data.run_db(self.runs_dir, run)
            if db is None:
                return self._not_found(request, f"no run named {run!r}")
            rows, total = data.list_rollouts(db, f)
            steps, envs = data.filter_choices(db)
            params = {k: v for k, v in qp.items() if k not in ("offset", "token")}
            return "rollouts.html", {"runs": data.run_names(self.runs_dir), "run": run, "rows": rows,
                                     "total": total, "f": f, "steps": steps, "envs": envs, "errors": errors,
                                     "sorts": list(data.SORTS), "params": params, "truncated": trunc,
                                     "kinds": ROLLOUT_KINDS}
        return await self._page(request, build)

    def _rollout_ctx(self, run: str, rid: int, view: str) -> dict[str, Any] | None:
        db = data.run_db(self.runs_dir, run)
        detail = data.read_rollout(db, rid) if db else None
        if detail is None:
            return None
        model = [t for t in detail.tokens if t.is_model]
        gaps = [t.gap for t in model if t.gap is not None]
        gens = [t.gen for t in model if t.gen is not None]
        stats = {
            "model_tokens": len(model),
            "mean_gen": sum(gens) / len(gens) if gens else None,
            "max_gap": max(gaps) if gaps else None,
            "mult_prob_error": sum(math.exp(g) for g in gaps) / len(gaps) if gaps else None,
        }
        color = _gap_color if view == "gap" else _gen_color
        toks = [{"t": t, "title": _token_title(t),
                 "bg": color(t.gap if view == "gap" else t.gen) if t.is_model else "",
                 "new_turn": i > 0 and t.turn != detail.tokens[i - 1].turn}
                for i, t in enumerate(detail.tokens)]
        return {"d": detail, "rid": rid, "view": view, "toks": toks, "stats": stats}

    async def rollout(self, request: Request) -> Response:
        run, rid = request.path_params["run"], request.path_params["rid"]
        view = "gap" if request.query_params.get("view") == "gap" else "gen"

        def build():
            ctx = self._rollout_ctx(run, rid, view)
            if ctx is None:
                return self._not_found(request, f"no rollout {rid} in run {run!r}")
            return "rollout.html", {"runs": data.run_names(self.runs_dir), "run": run, **ctx}
        return await self._page(request, build)

    async def tokens(self, request: Request) -> Response:
        run, rid = request.path_params["run"], request.path_params["rid"]
        view = "gap" if request.query_params.get("view") == "gap" else "gen"

        def build():
            ctx = self._rollout_ctx(run, rid, view)
            if ctx is None:
                return self._not_found(request, f"no rollout {rid} in run {run!r}")
            return "tokens.html", {"run": run, **ctx}
        return await self._page(request, build)

    def _gym_ctx(self) -> dict[str, Any]:
        error = None
        try:
            servers = list(self.gym_status()) if self.gym_status else []
        except Exception as e:  # the panel reports a broken status source instead of failing
            servers, error = [], f"gym status failed: {type(e).__name__}: {e}"
        return {"servers": [{"s": s, "log": data.tail(s.log_path)} for s in servers],
                "checked_at": time.strftime("%H:%M:%S"), "error": error}

    async def gym(self, request: Request) -> Response:
        def build():
            return "gym.html", {"runs": data.run_names(self.runs_dir), "run": None, **self._gym_ctx()}
        return await self._page(request, build)

    async def gym_live(self, request: Request) -> Response:
        return await self._page(request, lambda: ("gym_live.html", self._gym_ctx()))

    async def sql(self, request: Request) -> Response:
        if request.method == "POST":
            # Parsed by hand: Starlette's form parser needs python-multipart, urlencoded does not.
            form = {k: v[0] for k, v in parse_qs((await request.body()).decode("utf-8", "replace")).items()}
        else:
            form = dict(request.query_params)
        sql_text = form.get("q", "")
        run = form.get("run", "")
        fragment = request.method == "POST" and request.headers.get("hx-request") == "true"

        def build():
            names = data.run_names(self.runs_dir)
            chosen = run if run in names else (names[0] if names else "")
            result: dict[str, Any] | None = None
            if sql_text.strip():
                result = self._run_sql(chosen, sql_text)
            ctx = {"runs": names, "run": chosen or None, "sql_run": chosen, "q": sql_text, "result": result,
                   "examples": forensic_queries(), "timeout_s": SQL_TIMEOUT_S, "max_rows": SQL_MAX_ROWS}
            return ("sql_result.html" if fragment else "sql.html"), ctx
        return await self._page(request, build)

    def _run_sql(self, run: str, sql_text: str) -> dict[str, Any]:
        if not run:
            return {"error": "no run to query"}
        t0 = time.monotonic()
        try:
            cols, rows = ro_query(self.runs_dir / run / DB_NAME, sql_text, timeout_s=SQL_TIMEOUT_S,
                                  max_rows=SQL_MAX_ROWS + 1)
        except QueryError as e:
            return {"error": str(e)}
        return {"columns": cols, "rows": [[_cell(v) for v in row] for row in rows[:SQL_MAX_ROWS]],
                "more": len(rows) > SQL_MAX_ROWS, "elapsed_ms": (time.monotonic() - t0) * 1000}


def dashboard_routes(runs_dir: Path, gym_status: Callable[[], list[ServerStatus]] | None = None,
                     token: str | None = None) -> list[BaseRoute]:
    """Routes for the dashboard, to mount next to the policy server's /v1/* routes.

    runs_dir: folder whose sub-folders each hold a run's rollouts.db.
    gym_status: returns the Gym servers' state; called from a worker thread, so it must be thread-safe.
    token: when set, every dashboard route requires it (?token=, then a cookie, or a Bearer header).
    """
    return Dashboard(runs_dir, gym_status, token).routes()
