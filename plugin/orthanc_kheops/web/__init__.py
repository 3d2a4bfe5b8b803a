"""The REST API under /kheops/ and the Orthanc Explorer extension."""
