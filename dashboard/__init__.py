"""The training dashboard: Starlette + htmx pages served from the trainer's own event loop.

`dashboard.app.dashboard_routes(runs_dir, gym_status, token)` returns routes the trainer mounts next
to the policy server's /v1/* routes:

    /                          overview of the newest run (status, step, elapsed, live charts)
    /runs, /runs/{run}         all runs; one run's overview (charts refresh every 2 s via htmx)
    /runs/{run}/rollouts       rollout browser: filter by step, env, reward range, truncation
    /runs/{run}/rollouts/{id}  one rollout: conversation, verifier fields, coloured tokens
    /compare?a=RUN&b=RUN       two runs' reward curves on one chart
    /gym                       Gym servers up/down, restarts, log tails
    /sql                       read-only SQL console (store.ro_query: one statement, time limit)
    /static/{htmx.min.js,style.css}

Metric keys read from `steps.metrics` (the trainer's StepRecord.metrics): reward_mean,
reward/<env>_mean (per environment; when absent, per-env rewards are averaged from the rollouts
table), loss, kl, entropy, clip_low_frac, clip_high_frac, token_mult_prob_error, gen_kl_error,
tokens_per_s, time_generation_s, time_training_s, time_weight_sync_s, time_logging_s. All metrics
of the last step are listed on the overview, so extra keys are visible too.

Charts are inline SVG drawn on the server; htmx (vendored from the npm package htmx.org 2.0.11,
0BSD licence) is the only script. Every page is rendered by Jinja2 with autoescaping, so model
output shows as text.
"""
