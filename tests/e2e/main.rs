//! End-to-end tests against a real RabbitMQ broker.

mod gateway;
