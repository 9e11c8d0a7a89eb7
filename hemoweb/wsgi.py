import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hemoweb.settings")
# Web requests run side by side (gunicorn workers x threads): one torch thread per request keeps them
# from fighting over the cores. Large uploads are classified by the queue's workers, not here.
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("WEB_TORCH_THREADS", "1"))
application = get_wsgi_application()
