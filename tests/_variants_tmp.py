import cProfile, os
from rq import Worker
from django_flyworkers.worker import FlyWorker

def _profiled(cls):
    class P(cls):
        def main_work_horse(self, job, queue):
            prof = cProfile.Profile()
            prof.enable()
            try:
                cls.main_work_horse(self, job, queue)
            except SystemExit:
                pass
        def perform_job(self, job, queue, *a, **k):
            prof = cProfile.Profile()
            prof.enable()
            try:
                return cls.perform_job(self, job, queue, *a, **k)
            finally:
                prof.disable()
                prof.dump_stats(f"/tmp/horseprof/{cls.__name__}-{os.getpid()}.prof")
    return P

ProfRq = _profiled(Worker)
ProfFly = _profiled(FlyWorker)
