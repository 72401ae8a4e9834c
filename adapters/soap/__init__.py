"""SOAP contracts and helpers: the WSDL and XSD documents the gateway speaks, one package per peer."""
