ALTER TABLE api_keys DROP COLUMN client_name;
