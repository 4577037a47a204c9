DROP TRIGGER user_counts_delete ON users;
DROP TRIGGER user_counts_update ON users;
DROP TRIGGER user_counts_insert ON users;
DROP FUNCTION user_counts_of_delete();
DROP FUNCTION user_counts_of_update();
DROP FUNCTION user_counts_of_insert();
DROP TABLE user_counts;
