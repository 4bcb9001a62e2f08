"""HTTP face of the service: routes, upload parsing and the error handler."""
