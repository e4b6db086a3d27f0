# In-process CPU cost of the bench apps (cpu, hello) per call: the "limit" of issue 3 target 3
# (2 cores / CPU per request). usage: python3 tests/bench/inproc_cost.py (needs ../shared/bench).
import os, sys, time
sys.path.insert(0, os.environ.get('BENCH_APPS', os.path.join(os.path.dirname(os.path.abspath(__file__)), '../../../shared/bench')))
os.environ.setdefault('BENCH_CPU_ITERS', '12000')
import apps
def sr(s, h, e=None): pass
env = {'REQUEST_METHOD': 'GET', 'PATH_INFO': '/', 'QUERY_STRING': '', 'wsgi.input': None}
for name in ('cpu', 'hello'):
    app = getattr(apps, name)
    for _ in range(50): list(app(dict(env), sr))
    n = 2000 if name == 'cpu' else 200000
    t = time.process_time()
    for _ in range(n): list(app(dict(env), sr))
    dt = (time.process_time() - t) / n
    print('%s: %.1f us CPU per call in-process -> limit for 2 cores: %.0f rps' % (name, dt * 1e6, 2 / dt))
