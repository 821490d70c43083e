"""HTML for the demo (escaped, dependency-free)."""

from __future__ import annotations

from html import escape

STYLE = """
body{font:15px/1.5 system-ui,sans-serif;max-width:760px;margin:2rem auto;padding:0 1rem;color:#222}
nav a{margin-right:1rem} .flash{background:#e8f5e9;border:1px solid #a5d6a7;padding:.5rem 1rem;border-radius:6px}
table{border-collapse:collapse;width:100%} td,th{border-bottom:1px solid #ddd;padding:.35rem;text-align:left}
button{padding:.35rem .9rem;cursor:pointer} code{background:#f4f4f4;padding:0 .25rem}
.card{border:1px solid #ddd;border-radius:8px;padding:1rem;margin:1rem 0}
"""


def layout(title: str, body: str, *, token: str, user: str | None = None) -> str:
    """A page; *token* is the session's CSRF token, which every form and script POST carries."""
    nav = '<nav><a href="/">Home</a><a href="/race">Race</a><a href="/blocking">Blocking</a></nav>'
    who = f'<p>Signed in as <b id="user">{escape(user)}</b></p>' if user else ""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f'<meta name="csrf-token" content="{escape(token)}">'
        f"<style>{STYLE}</style></head><body>{nav}<h1>{escape(title)}</h1>{who}{body}</body></html>"
    )


def token_field(token: str) -> str:
    return f'<input type="hidden" name="_token" value="{escape(token)}">'


#: What a script's POST sends: the page's CSRF token in the header the middleware reads.
POST = "{method: 'POST', headers: {'X-CSRF-TOKEN': document.querySelector('meta[name=csrf-token]').content}}"


def login_form(token: str) -> str:
    return f"""
<p>Server-side sessions on SQLAlchemy. Sign in with any name: the session id is regenerated and a
background job (Dramatiq) fills your dashboard in the session.</p>
<form method="post" action="/login">{token_field(token)}
<input name="name" id="name" placeholder="Your name" required autofocus>
<button id="login" type="submit">Sign in</button></form>"""


def dashboard(flash: str | None, devices_rows: str, other_devices: int, token: str) -> str:
    notice = f'<p class="flash" id="flash">{escape(flash)}</p>' if flash else ""
    return f"""{notice}
<div class="card"><h2>Dashboard</h2><div id="dashboard">Preparing your dashboard in the background…</div></div>
<div class="card"><h2>Your devices</h2><table id="devices"><tr><th>Browser</th><th>OS</th><th>IP</th>
<th>Last active</th><th></th></tr>{devices_rows}</table>
<form method="post" action="/devices/revoke-others">{token_field(token)}
<button id="revoke-others" {"disabled" if not other_devices else ""}>Log out my other devices</button></form></div>
<form method="post" action="/logout">{token_field(token)}<button id="logout">Sign out</button></form>
<script>
async function poll() {{
  const r = await fetch('/api/dashboard'); const d = (await r.json()).dashboard;
  const box = document.getElementById('dashboard');
  if (!d) {{ setTimeout(poll, 300); return; }}
  box.innerHTML = '';
  const list = document.createElement('ul'); list.id = 'dashboard-ready';
  for (const [k, v] of Object.entries(d)) {{
    const li = document.createElement('li'); li.textContent = k + ': ' + JSON.stringify(v); list.appendChild(li);
  }}
  box.appendChild(list);
}}
poll();
</script>"""


def device_row(key: str, browser: str, system: str, ip: str, last_active: str, current: bool, token: str) -> str:
    action = (
        "<b>this device</b>"
        if current
        else f'<form method="post" action="/devices/revoke">{token_field(token)}'
        f'<input type="hidden" name="key" value="{escape(key)}">'
        f'<button class="revoke" type="submit">Log out</button></form>'
    )
    return (
        f'<tr class="device"><td>{escape(browser)}</td><td>{escape(system)}</td><td>{escape(ip)}</td>'
        f"<td>{escape(last_active)}</td><td>{action}</td></tr>"
    )


RACE = """
<p>Fires 50 requests at once from this browser into the same session, after a random delay each. A
store that writes the whole session back keeps only some of them; sqla_sessions merges each save onto
the stored row.</p>
<p><strong>Distinct keys</strong>: each request writes a key of its own.</p>
<button id="race">Fire 50 parallel requests</button> <p id="race-result"></p>
<p><strong>One list</strong>: each request does <code>session.push("race_list", n)</code> on the same
key; a save that lost the race replays its append onto the list as stored now (a three-way merge).</p>
<button id="race-list">Fire 50 parallel pushes</button> <p id="race-list-result"></p>
<script>
const POST = __POST__;
async function race(kind, resultId, label) {
  await fetch('/api/race/reset', POST);
  await Promise.all([...Array(50).keys()].map(i => fetch('/api/race/' + kind + '/' + i, POST)));
  const r = await (await fetch('/api/race')).json();
  document.getElementById(resultId).textContent = r[kind] + ' of 50 ' + label + ' kept';
}
document.getElementById('race').onclick = () => race('keys', 'race-result', 'writes');
document.getElementById('race-list').onclick = () => race('list', 'race-list-result', 'pushes');
</script>""".replace("__POST__", POST)

BLOCKING = """
<p>Both buttons send 5 parallel requests that each read a counter, wait 50 ms and assign it plus one
(<code>session[key] = value + 1</code>). A plain assignment is last-writer-wins
(<code>session.increment()</code> would merge its delta), so only running the requests one at a time
keeps every one. <code>/api/blocking/*</code> is a blocking route (a row lock on PostgreSQL, a lease on
SQLite).</p>
<button id="plain">5 × increment (normal route)</button>
<button id="blocking">5 × increment (blocking route)</button>
<p id="counters"></p>
<script>
const POST = __POST__;
async function run(path) {
  await Promise.all([...Array(5).keys()].map(() => fetch(path, POST)));
  const c = await (await fetch('/api/counters')).json();
  document.getElementById('counters').textContent =
    'normal route: ' + c.plain + ' · blocking route: ' + c.blocking;
}
document.getElementById('plain').onclick = () => run('/api/increment');
document.getElementById('blocking').onclick = () => run('/api/blocking/increment');
</script>""".replace("__POST__", POST)
