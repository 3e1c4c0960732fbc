use crate::config::{Config, PgConfig};
pub struct UserList;
impl UserList {
    pub fn load(_pg: &PgConfig, _root: &Config) -> Result<UserList, String> {
        Ok(UserList)
    }
}
