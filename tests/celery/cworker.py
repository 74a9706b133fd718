"""A real Celery worker's app for side-by-side tests: the tests' client app (capp, with its
QUEUE_TYPE / EXCHANGE_TYPE settings) plus the tasks this Celery worker serves, marked so a
result tells which worker ran it.

    celery -A cworker worker -Q QUEUE -n NODE --pool solo
"""

from capp import app


@app.task(name="f.ok")
def ok(*args):
    return ["celery"] + list(args)


@app.task(name="f.pid")
def pid():
    return "celery"
