# The sandbox project's image. The same image runs the web Machines (gunicorn, this CMD), the
# `scaler` process group (fly.toml) and the worker Machines django-flyworkers creates: those
# are created from FLY_IMAGE_REF, the image of the Machine that asks, with the command
# `python manage.py rqworker <queue> --burst ...`, run from the WORKDIR below.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app
WORKDIR /app

# Dependencies first, so code changes reuse this layer.
COPY pyproject.toml README.md ./
COPY django_flyworkers ./django_flyworkers
COPY sandbox_project/requirements.txt ./sandbox_project/requirements.txt
RUN pip install . -r sandbox_project/requirements.txt

COPY sandbox_project ./sandbox_project
WORKDIR /app/sandbox_project
# Settings refuse to start without a secret key unless DEBUG; collectstatic needs neither.
RUN DJANGO_SECRET_KEY=collectstatic-only python manage.py collectstatic --noinput

# Files stay root-owned and read-only to the app user.
USER app
EXPOSE 8000
CMD ["gunicorn", "sandbox.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "2", "--graceful-timeout", "30", "--access-logfile", "-"]
