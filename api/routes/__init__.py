"""The API's routes, one module per resource; `api.app` includes their routers."""
