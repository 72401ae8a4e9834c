"""The e-prescription flow, for drugs (dispensed by pharmacies) and acts (lab tests and imaging
examinations, performed by laboratories and imaging centres): ids (ids.py), signed QR payloads
(qr.py), the store (store.py), reading and annotating canonical bundles (bundle.py), the
translation step (flow.py), AMO eligibility (eligibility.py), the REST operations (api.py) and
the service that holds them (service.py)."""
