"""The PostgreSQL state back-end: one schema shared by every Orthanc node of a site."""
