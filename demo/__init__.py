"""The `make demo` sandbox: Orthanc with the plugin against a local KHEOPS test server."""
